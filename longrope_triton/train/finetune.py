"""Fine-tuning a patched model with LongRoPE2's mixed context window.

Each training row packs one *long* document (more than ``original_max_position_embeddings``
tokens: rescaled RoPE, the long factors) and a few *short* documents (at most L_orig tokens: the
original RoPE, the short factors) into a single sequence, with ``position_ids`` restarting at 0
for every document. The patched attention (:func:`longrope_triton.hf.patch_model`) sees batch 1,
restarting positions, no mask and no cache -- the transformers packing convention -- and runs the
varlen kernel with each document in its own regime, so one step trains the model to keep its
short-context behaviour and to use the rescaled long context (LongRoPE2 §3.3). Labels never cross
a document boundary (the first token of each document is not predicted).

The loop: AdamW, optional gradient accumulation and gradient checkpointing, a checkpoint
(model + optimizer + step) every ``save_every`` steps, written atomically. The data of step i
depend only on (seed, i), so a run resumed from a checkpoint continues exactly as the
uninterrupted run would have.

Over ranks (``torchrun``): data parallel splits each step's rows over the ranks; context
parallel (``context_parallel`` ranks per row) shards each document of a row over a group of
ranks. The loss is computed here, not by the model: labels are shifted on the whole row before
any sharding, and every part of a row is divided by the row's total number of scored tokens, so
the gradients summed over the ranks are exactly the single-process gradients.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pathlib
import random
import time
from typing import Optional, Sequence

import torch

from .. import parallel
from ..config import LongRoPEConfig

CHECKPOINT_NAME = "checkpoint.pt"


@dataclasses.dataclass
class PackedRow:
    input_ids: torch.Tensor  # (1, n)
    position_ids: torch.Tensor  # (1, n), restarting at 0 for each document
    labels: torch.Tensor  # (1, n), -100 at each document's first token
    doc_lengths: list


def pack_documents(segments: Sequence[torch.Tensor]) -> PackedRow:
    """One row from token segments: concatenated ids, per-document positions, boundary-safe labels."""
    ids = torch.cat(list(segments))
    pos = torch.cat([torch.arange(len(s)) for s in segments])
    labels = ids.clone()
    offset = 0
    for s in segments:
        labels[offset] = -100  # HF shifts labels: token 0 of a document would be predicted from the previous one
        offset += len(s)
    return PackedRow(ids[None], pos[None], labels[None], [len(s) for s in segments])


class MixedWindowSampler:
    """Rows of one long document (``long_tokens`` > L_orig) + ``shorts_per_row`` short documents
    (``short_tokens`` <= L_orig), cut at random from ``documents``; row i of step s depends only
    on (seed, s, i)."""

    def __init__(self, documents: Sequence[torch.Tensor], cfg: LongRoPEConfig, long_tokens: Optional[int] = None,
                 short_tokens: Optional[int] = None, shorts_per_row: int = 2, seed: int = 0):
        orig = cfg.original_max_position_embeddings
        self.long_tokens = int(long_tokens or cfg.max_position_embeddings)
        self.short_tokens = int(short_tokens or max(1, orig // 2))
        if not orig < self.long_tokens <= cfg.max_position_embeddings:
            raise ValueError(f"long documents need original_max_position_embeddings ({orig}) < long_tokens <= "
                             f"max_position_embeddings ({cfg.max_position_embeddings}); got {self.long_tokens}")
        if not 2 <= self.short_tokens <= orig:
            raise ValueError(f"short_tokens must be in [2, {orig}] (the original RoPE range), got {self.short_tokens}")
        self.documents = [d for d in documents if len(d) >= self.long_tokens]
        if not self.documents:
            raise ValueError(f"no document has the {self.long_tokens} tokens a long sample needs")
        self.shorts_per_row, self.seed = int(shorts_per_row), seed

    @property
    def row_tokens(self) -> int:
        return self.long_tokens + self.shorts_per_row * self.short_tokens

    def _cut(self, rng: random.Random, n: int) -> torch.Tensor:
        doc = self.documents[rng.randrange(len(self.documents))]
        start = rng.randrange(len(doc) - n + 1)
        return doc[start: start + n]

    def row(self, step: int, index: int = 0) -> PackedRow:
        digest = hashlib.sha256(f"mixed-window:{self.seed}:{step}:{index}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        segments = [self._cut(rng, self.long_tokens)] + [self._cut(rng, self.short_tokens)
                                                           for _ in range(self.shorts_per_row)]
        rng.shuffle(segments)
        return pack_documents(segments)


@dataclasses.dataclass
class FinetuneResult:
    losses: list  # loss of every step run in this call, in order
    step: int  # steps completed in total (including resumed ones)
    resumed_from: int


def save_checkpoint(directory, model, optimizer, step: int, extra: Optional[dict] = None) -> pathlib.Path:
    """Model + optimizer + step to ``<directory>/checkpoint.pt``, atomically (write then rename)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_NAME
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "extra": extra or {}}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(directory, model, optimizer) -> Optional[dict]:
    """Restore model and optimizer from ``<directory>/checkpoint.pt``; returns it, or None if absent."""
    path = pathlib.Path(directory) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, EOFError) as exc:
        raise ValueError(f"{path}: cannot resume from this checkpoint ({str(exc).splitlines()[0]})") from None
    return state


def finetune(model, cfg: LongRoPEConfig, documents: Sequence[torch.Tensor], steps: int,
             long_tokens: Optional[int] = None, short_tokens: Optional[int] = None, shorts_per_row: int = 2,
             lr: float = 2e-5, weight_decay: float = 0.0, grad_accum: int = 1, max_grad_norm: float = 1.0,
             gradient_checkpointing: bool = True, checkpoint_dir=None, save_every: int = 50, seed: int = 0,
             progress: bool = False, stop_after: Optional[int] = None, context_parallel: int = 1) -> FinetuneResult:
    """Train ``model`` for ``steps`` optimizer steps on mixed-window rows under ``cfg``.

    The model is patched with ``cfg`` for the duration (and unpatched after, unless the caller had
    patched it). With ``checkpoint_dir``, an existing checkpoint there is resumed and a new one is
    written every ``save_every`` steps and at the end. ``stop_after`` ends this call after that many
    steps (a simulated interruption, for tests). ``grad_accum`` is the number of rows per step.

    Under ``torchrun`` (W ranks, default process group initialized): the rows of a step are split
    over ``W / context_parallel`` data-parallel replicas, and the ``context_parallel`` ranks of a
    replica share each row, every rank holding the zigzag shard of each of its documents
    (:func:`longrope_triton.hf.patch_model` with ``process_group``). Gradients are summed over
    all ranks, so every rank takes the same optimizer step as one process running the whole batch
    would. Rank 0 writes the checkpoints; every rank reads the checkpoint directory on resume.

    Returns:
        FinetuneResult(losses of the steps run here, total steps done, step resumed from).
    """
    from ..eval.rope import use_rope

    sampler = MixedWindowSampler(documents, cfg, long_tokens, short_tokens, shorts_per_row, seed)
    ranks = _Ranks.split(context_parallel, grad_accum, sampler)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    state = load_checkpoint(checkpoint_dir, model, optimizer) if checkpoint_dir is not None else None
    start = int(state["step"]) if state else 0
    _check_same_start(start, checkpoint_dir)
    losses = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=start, desc="finetune", unit="step", dynamic_ncols=True)
    # the packed rows need the fused integration: its varlen path keeps documents apart (and its
    # context-parallel path shards them)
    try:
        with use_rope(model, cfg, "fused", process_group=ranks.group), _training(model, gradient_checkpointing):
            for step in range(start, steps if stop_after is None else min(steps, start + stop_after)):
                t0 = time.perf_counter()
                loss = _train_step(model, optimizer, params, sampler, ranks, step, grad_accum, max_grad_norm, device)
                losses.append(loss)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", s_per_step=f"{time.perf_counter() - t0:.1f}")
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {step}; lower --lr")
                done = step + 1
                if checkpoint_dir is not None and parallel.is_main() and (done % save_every == 0 or done == steps):
                    save_checkpoint(checkpoint_dir, model, optimizer, done, {"seed": seed, "lr": lr})
    finally:
        if bar is not None:
            bar.close()
    if checkpoint_dir is not None:
        parallel.barrier()  # rank 0's checkpoint is on disk when any rank returns (and may resume)
    return FinetuneResult(losses, start + len(losses), start)


class _training:
    """Train mode (and gradient checkpointing) inside, eval mode after."""

    def __init__(self, model, gradient_checkpointing: bool):
        self.model, self.gc = model, gradient_checkpointing

    def __enter__(self):
        if self.gc:
            # transformers >= 5.2x renamed it activation_checkpointing_*; older ones only have gradient_*
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()

    def __exit__(self, *exc):
        self.model.eval()
        if self.gc:
            disable = getattr(self.model, "activation_checkpointing_disable", None)
            (disable or self.model.gradient_checkpointing_disable)()
        return False


@dataclasses.dataclass(frozen=True)
class _Ranks:
    """How the ranks share a step: rows of the batch (data parallel) and shards of a row (context parallel).

    group: the ranks that share each row (None: no context parallel); replica / replicas: this
    rank's data-parallel index and their number."""

    group: Optional[object]
    replica: int
    replicas: int

    @classmethod
    def split(cls, context_parallel: int, grad_accum: int, sampler: MixedWindowSampler) -> "_Ranks":
        group, replica, replicas = parallel.sequence_groups(context_parallel)
        if grad_accum < replicas:
            raise ValueError(f"{grad_accum} rows per step (--grad-accum) cannot keep {replicas} data-parallel "
                             f"replicas busy: use --grad-accum >= {replicas}")
        chunks = 2 * context_parallel
        if group is not None and (sampler.long_tokens % chunks or sampler.short_tokens % chunks):
            raise ValueError(f"context parallel over {context_parallel} ranks cuts every document into {chunks} "
                             f"equal chunks: long_tokens ({sampler.long_tokens}) and short_tokens "
                             f"({sampler.short_tokens}) must be multiples of {chunks}")
        return cls(group, replica, replicas)

    def rows(self, grad_accum: int) -> list:
        """Indices of this replica's rows among the step's ``grad_accum``."""
        return parallel.share(range(grad_accum), self.replica, self.replicas)


def _check_same_start(start: int, checkpoint_dir) -> None:
    """Every rank resumed from the same step (else they would train different models)."""
    found = parallel.all_gather(start)
    if len(set(found)) > 1:
        raise ValueError(f"the ranks found different checkpoints in {checkpoint_dir} (steps {found}): the "
                         "checkpoint directory must be one that every rank reads")


def _train_step(model, optimizer, params, sampler, ranks: _Ranks, step: int, grad_accum: int,
                max_grad_norm: float, device) -> float:
    """One optimizer step over the step's rows (this rank's part of them); returns the step's loss."""
    optimizer.zero_grad(set_to_none=True)
    mine = 0.0
    for micro in ranks.rows(grad_accum):
        row = sampler.row(step, micro)
        for loss in _row_losses(model, row, ranks.group, device):
            (loss / grad_accum).backward()
            mine += float(loss.detach()) / grad_accum
    # each rank holds the gradient of its part of the step's loss: their sum is the whole step's
    parallel.sum_gradients(params)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return parallel.sum_float(mine)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with the inputs: position t predicts ``labels[t + 1]`` (-100 at the end), as the
    Hugging Face causal-LM loss shifts them. Done on the whole row, before any sharding."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)


def _row_losses(model, row: PackedRow, group, device):
    """This rank's part of a row's mean next-token loss, one tensor per forward it runs.

    The row's loss is the NLL summed over its scored tokens divided by their number, so it splits
    exactly into parts: one process runs the packed row in one forward; under context parallel
    each document of the row is one sequence, sharded over ``group`` (global positions, labels
    shifted before sharding), and this rank scores its shard. The parts of all ranks add up to the
    row's loss."""
    targets = shift_labels(row.labels)
    count = int((targets != -100).sum())
    pieces = [(row.input_ids, row.position_ids, targets)]
    if group is not None:
        from ..distributed import shard_sequence
        bounds = torch.tensor([0, *row.doc_lengths]).cumsum(0).tolist()
        pieces = [tuple(shard_sequence(t[:, a:b], dim=1, group=group) for t in (row.input_ids, row.position_ids,
                                                                                  targets))
                  for a, b in zip(bounds, bounds[1:])]
    for ids, pos, tgt in pieces:
        logits = model(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=False).logits
        yield torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tgt.to(device).flatten(),
                                                ignore_index=-100, reduction="sum") / count


def run_finetune(model: str = "smollm2", text: str = "austen:search", factors: str = "smollm2-135m-16k",
                 steps: int = 100, long_tokens: Optional[int] = None, short_tokens: Optional[int] = None,
                 shorts_per_row: int = 2, lr: float = 2e-5, weight_decay: float = 0.0, grad_accum: int = 1,
                 gradient_checkpointing: bool = True, checkpoint: str = "finetune-ckpt", save_every: int = 50,
                 seed: int = 0, output: Optional[str] = None, context_parallel: int = 1,
                 print_fn=print) -> FinetuneResult:
    """CLI entry: load model, text and factors, fine-tune, optionally save the extended model.
    Under ``torchrun`` each rank trains on its own device (see :func:`finetune`); rank 0 prints and saves."""
    from ..eval.common import load_model, load_texts
    from ..eval.methods import load_factors
    from ..eval.perplexity import tokenize_documents

    print_fn = parallel.main_only(print_fn)
    cfg = load_factors(factors)
    texts = load_texts(text)
    mdl, tok = load_model(model, device=parallel.device())
    docs = tokenize_documents(tok, list(texts.values()))
    result = finetune(mdl, cfg, docs, steps, long_tokens, short_tokens, shorts_per_row, lr, weight_decay,
                      grad_accum, gradient_checkpointing=gradient_checkpointing, checkpoint_dir=checkpoint,
                      save_every=save_every, seed=seed, progress=parallel.is_main(),
                      context_parallel=context_parallel)
    if result.resumed_from:
        print_fn(f"resumed from step {result.resumed_from}")
    if result.losses:
        print_fn(f"steps {result.resumed_from + 1}-{result.step}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    if output and parallel.is_main():
        from ..hf import set_rope
        set_rope(mdl, cfg)
        mdl.save_pretrained(output)
        tok.save_pretrained(output)
        print_fn(f"saved the fine-tuned model (config with the LongRoPE factors) to {output}")
    return result

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
             progress: bool = False, stop_after: Optional[int] = None) -> FinetuneResult:
    """Train ``model`` for ``steps`` optimizer steps on mixed-window rows under ``cfg``.

    The model is patched with ``cfg`` for the duration (and unpatched after, unless the caller had
    patched it). With ``checkpoint_dir``, an existing checkpoint there is resumed and a new one is
    written every ``save_every`` steps and at the end. ``stop_after`` ends this call after that many
    steps (a simulated interruption, for tests).

    Returns:
        FinetuneResult(losses of the steps run here, total steps done, step resumed from).
    """
    from ..eval.rope import use_rope

    sampler = MixedWindowSampler(documents, cfg, long_tokens, short_tokens, shorts_per_row, seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
    state = load_checkpoint(checkpoint_dir, model, optimizer) if checkpoint_dir is not None else None
    start = int(state["step"]) if state else 0
    losses = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=start, desc="finetune", unit="step", dynamic_ncols=True)
    # the packed rows need the fused integration: its varlen path keeps documents apart
    try:
        with use_rope(model, cfg, "fused"), _training(model, gradient_checkpointing):
            _train_loop(model, optimizer, sampler, start, steps, grad_accum, max_grad_norm, stop_after,
                        checkpoint_dir, save_every, {"seed": seed, "lr": lr}, losses, bar, device)
    finally:
        if bar is not None:
            bar.close()
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


def _train_loop(model, optimizer, sampler, start, steps, grad_accum, max_grad_norm, stop_after, checkpoint_dir,
                save_every, extra, losses, bar, device):
    for step in range(start, steps):
        if stop_after is not None and step - start >= stop_after:
            break
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(grad_accum):
            row = sampler.row(step, micro)
            out = model(input_ids=row.input_ids.to(device), position_ids=row.position_ids.to(device),
                        labels=row.labels.to(device), use_cache=False)
            (out.loss / grad_accum).backward()
            total += float(out.loss.detach()) / grad_accum
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        losses.append(total)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", s_per_step=f"{time.perf_counter() - t0:.1f}")
        if not math.isfinite(total):
            raise FloatingPointError(f"loss became {total} at step {step}; lower --lr")
        done = step + 1
        if checkpoint_dir is not None and (done % save_every == 0 or done == steps):
            save_checkpoint(checkpoint_dir, model, optimizer, done, extra)


def run_finetune(model: str = "smollm2", text: str = "austen:search", factors: str = "smollm2-135m-16k",
                 steps: int = 100, long_tokens: Optional[int] = None, short_tokens: Optional[int] = None,
                 shorts_per_row: int = 2, lr: float = 2e-5, weight_decay: float = 0.0, grad_accum: int = 1,
                 gradient_checkpointing: bool = True, checkpoint: str = "finetune-ckpt", save_every: int = 50,
                 seed: int = 0, output: Optional[str] = None, print_fn=print) -> FinetuneResult:
    """CLI entry: load model, text and factors, fine-tune, optionally save the extended model."""
    from ..eval.common import load_model, load_texts
    from ..eval.methods import load_factors
    from ..eval.perplexity import tokenize_documents

    cfg = load_factors(factors)
    texts = load_texts(text)
    mdl, tok = load_model(model)
    docs = tokenize_documents(tok, list(texts.values()))
    result = finetune(mdl, cfg, docs, steps, long_tokens, short_tokens, shorts_per_row, lr, weight_decay,
                      grad_accum, gradient_checkpointing=gradient_checkpointing, checkpoint_dir=checkpoint,
                      save_every=save_every, seed=seed, progress=True)
    if result.resumed_from:
        print_fn(f"resumed from step {result.resumed_from}")
    if result.losses:
        print_fn(f"steps {result.resumed_from + 1}-{result.step}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    if output:
        from ..hf import set_rope
        set_rope(mdl, cfg)
        mdl.save_pretrained(output)
        tok.save_pretrained(output)
        print_fn(f"saved the fine-tuned model (config with the LongRoPE factors) to {output}")
    return result

"""Perplexity at long context: sliding windows over documents, scoring only each window's tail.

For a context length L and ``score_tokens`` N, each window is L consecutive tokens of one
document and only its last N tokens are scored, each with at least L - N tokens of context.
Windows slide by N, so a document of n tokens gives (n - L) // N + 1 windows and no token is
scored twice; ``max_windows`` keeps an evenly spaced subset. Only the N + 1 logits needed are
computed (``logits_to_keep``): the LM head over the whole window would cost as much as the
rest of the model at 16K on a CPU and ~L x vocab x 4 bytes of memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import parallel
from ..config import LongRoPEConfig
from .rope import check_length, use_rope


@dataclasses.dataclass
class Window:
    """Tokens ``[start, start + length)`` of document ``doc``; the last ``score_tokens`` are scored."""

    doc: int
    start: int
    length: int
    score_tokens: int


@dataclasses.dataclass
class PerplexityResult:
    length: int
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    windows: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def tokenize_documents(tokenizer, texts: Sequence[str]) -> list:
    """Token ids (1-D LongTensor) of each text, without special tokens."""
    return [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=torch.long) for t in texts]


def sliding_windows(doc_lengths: Sequence[int], length: int, score_tokens: Optional[int] = None,
                    max_windows: Optional[int] = None) -> list:
    """Windows of ``length`` tokens sliding by ``score_tokens`` over every document long enough;
    with ``max_windows``, an evenly spaced subset (deterministic)."""
    score = length if score_tokens is None else min(int(score_tokens), length)
    if score < 1:
        raise ValueError(f"score_tokens must be >= 1, got {score_tokens}")
    windows = []
    for doc, n in enumerate(doc_lengths):
        # the first scored token needs a predecessor: a window scoring all L tokens starts at 1
        first = 1 if score == length else 0
        if n - first < length:
            continue
        windows += [Window(doc, s, length, score) for s in range(first, n - length + 1, score)]
    if not windows:
        raise ValueError(f"no document is longer than {length} tokens (longest: {max(doc_lengths, default=0)})")
    if max_windows is not None and len(windows) > max_windows:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        picks = [round(i * (len(windows) - 1) / max(max_windows - 1, 1)) for i in range(max_windows)]
        if max_windows == 1:
            picks = [len(windows) // 2]
        windows = [windows[i] for i in picks]
    return windows


def aligned_windows(doc_lengths: Sequence[int], lengths: Sequence[int], score_tokens: int,
                    max_windows: Optional[int] = None) -> dict:
    """{length: windows} where every length scores the same tokens: the windows of the longest
    length, shortened from the left. Compares contexts fairly (e.g. 16K extended vs the native 8K)."""
    longest = max(lengths)
    base = sliding_windows(doc_lengths, longest, score_tokens, max_windows)
    if score_tokens > min(lengths):
        raise ValueError(f"score_tokens ({score_tokens}) must not exceed the shortest length ({min(lengths)})")
    return {n: [Window(w.doc, w.start + longest - n, n, w.score_tokens) for w in base] for n in lengths}


@torch.inference_mode()
def window_nll(model, input_ids: torch.Tensor, score_tokens: int, targets: Optional[torch.Tensor] = None):
    """Sum of negative log-likelihoods of the last ``score_tokens`` tokens and their count.

    ``input_ids`` is (1, L) or (L,). With ``targets`` (the tokens to score), the window is
    ``input_ids`` followed by nothing: logits of the last ``score_tokens`` positions predict
    ``targets``. Without, the last ``score_tokens`` tokens of the window are the targets.
    """
    ids = input_ids.reshape(1, -1)
    device = next(model.parameters()).device
    ids = ids.to(device)
    if targets is None:
        out = model(input_ids=ids, logits_to_keep=score_tokens + 1, use_cache=False)
        logits, tgt = out.logits[0, :-1], ids[0, -score_tokens:]
    else:
        out = model(input_ids=ids, logits_to_keep=score_tokens, use_cache=False)
        logits, tgt = out.logits[0], targets.reshape(-1).to(device)
    nll = F.cross_entropy(logits.float(), tgt, reduction="sum")
    return float(nll), int(tgt.numel())


def perplexity(model, documents: Sequence[torch.Tensor], length: int, cfg: Optional[LongRoPEConfig] = None,
               score_tokens: Optional[int] = None, max_windows: Optional[int] = None, backend: str = "auto",
               progress: bool = False, desc: Optional[str] = None, windows: Optional[Sequence[Window]] = None
               ) -> PerplexityResult:
    """Perplexity of ``model`` (under ``cfg`` if given) at context ``length`` over token documents.

    Args:
        documents: 1-D token-id tensors (see :func:`tokenize_documents`).
        length: window (context) length in tokens.
        cfg: RoPE config to run under (None: the model as it is).
        score_tokens: tokens scored per window (the tail; None -> the whole window).
        max_windows: evenly spaced subset of the sliding windows.
        backend: see :mod:`longrope_triton.eval.rope`.
        windows: explicit windows (e.g. from :func:`aligned_windows`) instead of the sliding ones.

    Returns:
        PerplexityResult (perplexity = exp(mean NLL over scored tokens)). Under ``torchrun`` the
        windows are split over the ranks (see :func:`perplexities`).
    """
    if windows is None:
        windows = sliding_windows([len(d) for d in documents], length, score_tokens, max_windows)
    return perplexities(model, documents, [PerplexityRun(length, windows, cfg)], backend, progress,
                        desc or f"ppl@{length}")[0]


@dataclasses.dataclass
class PerplexityRun:
    """One perplexity to compute: ``windows`` of ``length`` tokens under ``cfg`` (None: the model as it is)."""

    length: int
    windows: Sequence[Window]
    cfg: Optional[LongRoPEConfig] = None


def perplexities(model, documents: Sequence[torch.Tensor], runs: Sequence[PerplexityRun], backend: str = "auto",
                 progress: bool = False, desc: str = "perplexity", on_result=None) -> list:
    """The PerplexityResult of every run, in order; ``on_result(i, result)`` as each one completes.

    Every (run, window) pair is one work item of :func:`longrope_triton.parallel.imap`: under
    ``torchrun`` the windows of all runs are split over the ranks and their NLL sums gathered, so
    a single window per run still keeps every rank busy, and each run's sum adds the same
    numbers in the same order as one process would.
    """
    for run in runs:
        if run.cfg is not None:
            check_length(run.cfg, run.length)
        if not run.windows:
            raise ValueError(f"no window to score at length {run.length}")
        if any(w.length != run.length for w in run.windows):
            raise ValueError(f"explicit windows must have length {run.length}")
    items = [(i, w) for i, run in enumerate(runs) for w in run.windows]

    def nll_of(item):
        i, w = item
        ctx = use_rope(model, runs[i].cfg, backend) if runs[i].cfg is not None else contextlib.nullcontext()
        with ctx:
            return window_nll(model, documents[w.doc][w.start: w.start + w.length], w.score_tokens)

    results = parallel.imap(nll_of, items)
    if progress:
        from tqdm.auto import tqdm
        results = tqdm(results, total=len(items), desc=desc, unit="win", leave=False, dynamic_ncols=True)
    sums = [[0.0, 0, 0] for _ in runs]  # per run: NLL sum, scored tokens, windows done
    out = [None] * len(runs)
    for (i, _), (nll, n) in zip(items, results):
        sums[i] = [sums[i][0] + nll, sums[i][1] + n, sums[i][2] + 1]
        if sums[i][2] == len(runs[i].windows):
            out[i] = _result(runs[i].length, *sums[i])
            if on_result is not None:
                on_result(i, out[i])
    return out


def _result(length: int, total: float, count: int, windows: int) -> PerplexityResult:
    mean = total / count
    return PerplexityResult(length, math.exp(mean) if mean < 700 else math.inf, mean, count, windows)

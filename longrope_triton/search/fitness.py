"""Fitness functions for the factor search: callables ``fitness(cfg) -> float`` (lower is better)
with a ``describe()`` dict that identifies the model and data (written into the search log, so a
log is never resumed against other data).

* :class:`PerplexityFitness` -- LongRoPE: perplexity of the last ``score_tokens`` tokens of a few
  windows of ``length`` tokens.
* :class:`NeedleFitness` -- LongRoPE2: needle-driven perplexity. A magic number is inserted at a
  depth of a long haystack and asked for at the end; the loss is taken on the answer tokens only,
  so the fitness measures whether the model can *use* the distant context, not only whether its
  local next-token prediction survives the rescaling.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Optional, Sequence

import torch

from ..config import LongRoPEConfig
from ..eval.passkey import needle_sample
from ..eval.perplexity import sliding_windows, window_nll
from ..eval.rope import check_length, resolve_backend, use_rope


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def model_name(model) -> str:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None) or type(model).__name__
    params = sum(p.numel() for p in model.parameters())
    return f"{name} ({type(model).__name__}, {params} params)"


class PerplexityFitness:
    """Mean perplexity of the tails of ``windows`` windows of ``length`` tokens.

    Args:
        model: a (patchable) causal LM.
        documents: 1-D token-id tensors.
        length: context length evaluated (the search target).
        score_tokens: scored tail of each window.
        windows: number of windows (evenly spaced over the sliding windows of all documents).
        backend: how the config is applied (see :mod:`longrope_triton.eval.rope`).
        model_id: a name for the log header (default: derived from the model).
    """

    def __init__(self, model, documents: Sequence[torch.Tensor], length: int, score_tokens: int = 4096,
                 windows: int = 1, backend: str = "auto", model_id: Optional[str] = None):
        self.model, self.documents, self.length = model, list(documents), int(length)
        self.score_tokens = min(int(score_tokens), self.length)
        self.windows = sliding_windows([len(d) for d in self.documents], self.length, self.score_tokens, windows)
        self.backend = resolve_backend(backend)
        self.model_id = model_id or model_name(model)

    def describe(self) -> dict:
        return {"kind": "perplexity", "model": self.model_id, "length": self.length,
                "score_tokens": self.score_tokens, "backend": self.backend,
                "windows": [[w.doc, w.start] for w in self.windows],
                "data": _digest([self.documents[w.doc][w.start: w.start + w.length] for w in self.windows])}

    def __call__(self, cfg: LongRoPEConfig) -> float:
        check_length(cfg, self.length)
        total, count = 0.0, 0
        with use_rope(self.model, cfg, self.backend):
            for w in self.windows:
                nll, n = window_nll(self.model, self.documents[w.doc][w.start: w.start + w.length], w.score_tokens)
                total, count = total + nll, count + n
        mean = total / count
        return math.exp(mean) if mean < 700 else math.inf


class NeedleFitness:
    """LongRoPE2 needle-driven perplexity: exp(mean NLL of the answer tokens) over needle samples.

    Each sample is a haystack of ``length`` tokens cut from ``documents`` with a magic-number
    needle inserted at a depth (evenly spread over ``depths``) and the question at the end; only
    the answer digits are scored.
    """

    def __init__(self, model, tokenizer, documents: Sequence[torch.Tensor], length: int, samples: int = 2,
                 depths: Sequence[float] = (0.1, 0.5, 0.9), seed: int = 0, backend: str = "auto",
                 model_id: Optional[str] = None):
        self.model, self.length = model, int(length)
        self.backend = resolve_backend(backend)
        self.model_id = model_id or model_name(model)
        rng = random.Random(seed)
        windows = sliding_windows([len(d) for d in documents], self.length, None, samples)
        self.samples = []
        for i, w in enumerate(windows):
            depth = depths[i % len(depths)]
            haystack = documents[w.doc][w.start: w.start + w.length]
            self.samples.append(needle_sample(tokenizer, haystack, self.length, depth, rng))
        self.seed, self.depths = seed, list(depths)

    def describe(self) -> dict:
        return {"kind": "needle", "model": self.model_id, "length": self.length, "backend": self.backend,
                "depths": self.depths, "seed": self.seed, "samples": len(self.samples),
                "data": _digest([s.input_ids for s in self.samples] + [s.answer_ids for s in self.samples])}

    def __call__(self, cfg: LongRoPEConfig) -> float:
        check_length(cfg, self.length)
        total, count = 0.0, 0
        with use_rope(self.model, cfg, self.backend):
            for s in self.samples:
                ids = torch.cat([s.input_ids, s.answer_ids[:-1]])
                nll, n = window_nll(self.model, ids, len(s.answer_ids), targets=s.answer_ids)
                total, count = total + nll, count + n
        mean = total / count
        return math.exp(mean) if mean < 700 else math.inf

"""Run a Hugging Face model under a given LongRoPEConfig, for evaluation and search.

Two backends:

* ``"fused"`` -- :func:`longrope_triton.hf.patch_model`: the attention modules run
  :func:`~longrope_triton.fused_rope_attention` with the config (Triton on GPU, a PyTorch path on
  CPU). The library's own integration; the default when it is available.
* ``"stock"`` -- the model's own attention, with its rotary-embedding module replaced by one that
  returns cos/sin computed in float64 from the config (short/long switch by max(position) + 1,
  n_hat bypass and mscale included). Needs nothing but transformers; supports models whose
  rotary embedding rotates the whole head in "half" pairs (Llama, Mistral, Qwen2).

Both compute the same function (up to float rounding): the choice is about speed and about
checking one against the other.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

from .. import reference
from ..config import LongRoPEConfig

BACKENDS = ("auto", "fused", "stock")


def resolve_backend(backend: str) -> str:
    """'auto' -> 'fused' when longrope_triton.hf is importable, else 'stock'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "fused" if importlib.util.find_spec("longrope_triton.hf") is not None else "stock"
    return backend


class ConfigRotaryEmbedding(torch.nn.Module):
    """Drop-in for a transformers rotary-embedding module: ``forward(x, position_ids) -> (cos, sin)``
    of shape (batch, seq, head_dim) in x's dtype, from a LongRoPEConfig (float64 angles)."""

    def __init__(self, cfg: LongRoPEConfig):
        super().__init__()
        if cfg.interleaved or cfg.rotary_dim != cfg.head_dim:
            raise ValueError("the 'stock' backend supports only full-head, non-interleaved rotary; "
                             "use backend='fused'")
        self.cfg = cfg

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        seq_len = int(position_ids.max()) + 1
        cos, sin = reference.rope_cos_sin(self.cfg, position_ids, self.cfg.use_long(seq_len))
        cos = torch.cat((cos, cos), dim=-1).to(x.dtype)
        sin = torch.cat((sin, sin), dim=-1).to(x.dtype)
        return cos, sin


def _rotary_owner(model):
    """(module, attribute name) of the model's shared rotary-embedding module."""
    for module in model.modules():
        if isinstance(getattr(module, "rotary_emb", None), torch.nn.Module):
            return module, "rotary_emb"
    raise ValueError(f"{type(model).__name__} has no rotary_emb module; use backend='fused'")


def check_length(cfg: LongRoPEConfig, length: int):
    """Positions must stay below max_position_embeddings: a clear error instead of garbage."""
    if length > cfg.max_position_embeddings:
        raise ValueError(f"length {length} exceeds the config's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")


@contextlib.contextmanager
def use_rope(model, cfg: LongRoPEConfig, backend: str = "auto", process_group=None):
    """Context manager: inside it ``model`` runs with ``cfg``; the model is restored on exit.

    ``process_group``: context parallel (the fused backend's ``patch_model(process_group=...)``):
    each rank of the group feeds its zigzag shard of every sequence.

    Example:
        >>> with use_rope(model, LongRoPEConfig.pi(64, 8192, 16384, base=1e5)):   # doctest: +SKIP
        ...     logits = model(ids).logits
    """
    backend = resolve_backend(backend)
    if backend == "stock" and process_group is not None:
        raise ValueError("context parallel (process_group) needs backend='fused'")
    if backend == "stock":
        owner, name = _rotary_owner(model)
        original = getattr(owner, name)
        setattr(owner, name, ConfigRotaryEmbedding(cfg))
        try:
            yield model
        finally:
            setattr(owner, name, original)
        return
    from ..hf import patch_model, unpatch_model

    # a model the caller patched keeps its own config and regime: restored on exit
    previous = getattr(model, "_longrope_patch", None)
    if previous is not None:
        unpatch_model(model)
    patch_model(model, cfg, process_group=process_group)
    try:
        yield model
    finally:
        unpatch_model(model)
        if previous is not None:
            patch_model(model, previous.cfg, regime=previous.regime, process_group=previous.process_group)

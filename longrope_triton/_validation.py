"""Input checks shared by the public operations: clear ValueError/TypeError, never a wrong answer."""

from __future__ import annotations

from typing import Optional

import torch

from .config import LongRoPEConfig

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_config(cfg) -> None:
    if not isinstance(cfg, LongRoPEConfig):
        raise TypeError(f"cfg must be a LongRoPEConfig, got {type(cfg).__name__}")


def check_heads(name: str, t, cfg: LongRoPEConfig) -> None:
    """t is a float tensor (batch, heads, seq, head_dim) matching cfg.head_dim."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape (batch, heads, seq, head_dim), got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dtype == torch.float64 and t.is_cuda:
        raise TypeError(f"{name}: float64 is supported on CPU tensors only")
    if t.shape[-1] != cfg.head_dim:
        raise ValueError(f"{name} has head_dim {t.shape[-1]} but cfg.head_dim is {cfg.head_dim}")


def check_same(names: str, *tensors) -> None:
    """Same dtype and device for all tensors."""
    first = tensors[0]
    for t in tensors[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{names} must share one dtype, got {[str(x.dtype) for x in tensors]}")
        if t.device != first.device:
            raise ValueError(f"{names} must be on one device, got {[str(x.device) for x in tensors]}")


def check_gqa(q_heads: int, kv_heads: int) -> None:
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of k/v heads ({kv_heads})")


def check_positions(name: str, position_ids, batch: int, seq: int, device) -> Optional[torch.Tensor]:
    """position_ids: None, or an int tensor (seq,) or (batch | 1, seq) on the tensors' device."""
    if position_ids is None:
        return None
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"{name} must be an int tensor, got {type(position_ids).__name__}")
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {position_ids.dtype}")
    if position_ids.device != device:
        raise ValueError(f"{name} is on {position_ids.device} but the tensors are on {device}")
    shape = tuple(position_ids.shape)
    if shape not in ((seq,), (1, seq), (batch, seq)):
        raise ValueError(f"{name} must have shape ({seq},) or ({batch}, {seq}), got {shape}")
    return position_ids if position_ids.dim() == 2 else position_ids[None]


def check_seq_len(seq_len) -> Optional[int]:
    if seq_len is None:
        return None
    if isinstance(seq_len, bool) or not isinstance(seq_len, int):
        raise TypeError(f"seq_len must be an int, got {type(seq_len).__name__}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return seq_len


def check_position_range(pos: torch.Tensor, cfg_max: int, name: str = "position_ids") -> int:
    """Validate position values (one host sync) and return max(position) + 1."""
    lo, hi = int(pos.min()), int(pos.max())
    if lo < 0:
        raise ValueError(f"{name} must be non-negative, got {lo}")
    if hi >= cfg_max:
        raise ValueError(f"{name} reach {hi}, past max_position_embeddings ({cfg_max}) of the config")
    return hi + 1

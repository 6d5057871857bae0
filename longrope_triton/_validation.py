"""Input checks shared by the public operations: clear ValueError/TypeError, never a wrong answer.

Two kinds of checks:

- **Metadata** (types, shapes, dtypes, devices): host-only, always on, even under tracing.
- **Values** (positions in range, cu_seqlens monotone, ...): they read tensor contents, which on a
  GPU is a device->host sync that stalls the stream, breaks a ``torch.compile(fullgraph=True)``
  graph and cannot be captured in a CUDA graph. So they depend on the mode (:func:`value_checks`):

  - eager (default): a ValueError naming the problem, at the cost of one read per check;
  - under ``torch.compile``, ``torch.export`` or CUDA-graph capture: runtime asserts on the
    device (``torch._assert_async``), no read, the graph stays whole;
  - eager with ``LONGROPE_TRITON_EAGER_CHECKS=0``: skipped, no read at all. The kernels clamp
    every table row they index, so a bad value gives a wrong number, never a read out of bounds.

Each value is checked once, by the public function that receives it (``apply_rotary``,
``fused_rope_attention``); what runs after trusts it.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from .config import LongRoPEConfig

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)
# The one switch of the eager value checks (read lazily, at every check).
EAGER_CHECKS_ENV = "LONGROPE_TRITON_EAGER_CHECKS"


# ---------------------------------------------------------------------------- modes
def tracing(*tensors) -> bool:
    """True when no tensor value may be read on the host: torch.compile / torch.export tracing,
    fake tensors, or a CUDA stream being captured into a graph."""
    if torch.compiler.is_compiling():
        return True
    if any(is_fake(t) for t in tensors if isinstance(t, torch.Tensor)):
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def eager_checks_enabled() -> bool:
    """False when LONGROPE_TRITON_EAGER_CHECKS=0: eager calls read no tensor value to check it."""
    return os.environ.get(EAGER_CHECKS_ENV, "1") != "0"


def value_checks(*tensors) -> str:
    """How value checks run now: "assert" (device-side asserts: tracing or capture), "raise" (eager,
    ValueError after one read) or "off" (eager with the checks switched off)."""
    if tracing(*tensors):
        return "assert"
    return "raise" if eager_checks_enabled() else "off"


def host_reads_allowed(*tensors) -> bool:
    """True when this call may read tensor values on the host: eager mode with eager checks on.
    Besides the checks, the Hugging Face integration uses it for what it may learn by reading
    (an all-ones attention mask, the stale-cache warning)."""
    return value_checks(*tensors) == "raise"


# ---------------------------------------------------------------------------- metadata
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


def _check_int_tensor(name: str, t, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the tensors are on {device}")


def check_positions(name: str, position_ids, batch: int, seq: int, device) -> Optional[torch.Tensor]:
    """position_ids: None, or an int tensor (seq,) or (batch | 1, seq) on the tensors' device.
    Returns it as (batch | 1, seq). Metadata only: check_position_values checks the values."""
    if position_ids is None:
        return None
    _check_int_tensor(name, position_ids, device)
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


def check_use_long(use_long, shapes: tuple, what: str, device) -> Optional[torch.Tensor]:
    """use_long: None, or a bool tensor of one of ``shapes`` (the first one is named in errors) on the
    tensors' device: True where a sequence runs the long factors."""
    if use_long is None:
        return None
    if not isinstance(use_long, torch.Tensor) or use_long.dtype != torch.bool:
        got = use_long.dtype if isinstance(use_long, torch.Tensor) else type(use_long).__name__
        raise TypeError(f"use_long must be a bool tensor, got {got}")
    if use_long.device != device:
        raise ValueError(f"use_long is on {use_long.device} but the tensors are on {device}")
    if tuple(use_long.shape) not in shapes:
        raise ValueError(f"use_long must have shape {shapes[0]} ({what}), got {tuple(use_long.shape)}")
    return use_long


def check_cu_seqlens(name: str, cu, device) -> Optional[torch.Tensor]:
    """cu_seqlens: None, or a 1-D int32/int64 tensor of at least 2 entries on the tensors' device."""
    if cu is None:
        return None
    if not isinstance(cu, torch.Tensor) or cu.dtype not in INT_DTYPES or cu.dim() != 1:
        raise TypeError(f"{name} must be a 1-D int32/int64 tensor")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the tensors are on {device}")
    if cu.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 entries (0 and the packed length), got {cu.shape[0]}")
    return cu


def check_seqused_k(seqused_k, batch: int, device) -> Optional[torch.Tensor]:
    """seqused_k: None, or an int tensor (batch,) on the tensors' device."""
    if seqused_k is None:
        return None
    _check_int_tensor("seqused_k", seqused_k, device)
    if tuple(seqused_k.shape) != (batch,):
        raise ValueError(f"seqused_k must have shape ({batch},) (one key count per batch row), "
                         f"got {tuple(seqused_k.shape)}")
    return seqused_k


# ---------------------------------------------------------------------------- values
def _host_values(*values: torch.Tensor) -> list:
    """The values of 0-d tensors in one device->host copy (int() of the host copy's elements goes
    through aten._local_scalar_dense, which a TorchDispatchMode sees even for CPU tensors)."""
    return [int(v) for v in torch.stack([v.to(torch.int64) for v in values]).cpu()]


def check_position_values(name: str, pos: torch.Tensor, cfg_max: int) -> None:
    """0 <= every position < max_position_embeddings (see the module docstring for the modes)."""
    mode = value_checks(pos)
    if mode == "off" or pos.numel() == 0:
        return
    if mode == "assert":
        torch._assert_async(((pos >= 0) & (pos < cfg_max)).all(),
                            f"longrope_triton: {name} must lie in [0, max_position_embeddings = {cfg_max})")
        return
    lo, hi = _host_values(pos.min(), pos.max())
    if lo < 0:
        raise ValueError(f"{name} must be non-negative, got {lo}")
    if hi >= cfg_max:
        raise ValueError(f"{name} reach {hi}, past max_position_embeddings ({cfg_max}) of the config")


def check_default_positions(end: int, cfg_max: int) -> None:
    """Default positions arange(..., end): a host check of the shapes, no read."""
    if end > cfg_max:
        raise ValueError(f"sequence reaches position {end - 1}, past max_position_embeddings ({cfg_max}) of the config")


def _require(t: torch.Tensor, ok, message: str, detail: str = "") -> None:
    """Check the condition ``ok(t)`` (a 0-d bool tensor) in the mode of ``t``: a device assert saying
    ``message``, or a ValueError saying ``message`` + ``detail`` after one read. ``detail`` is left out
    of the assert: a shape in it would specialize a dynamic-shape graph."""
    mode = value_checks(t)
    if mode == "assert":
        torch._assert_async(ok(t), f"longrope_triton: {message}")
    elif mode == "raise" and not _host_values(ok(t))[0]:
        raise ValueError(message + detail)


def check_cu_seqlens_values(name: str, cu: torch.Tensor, total: int) -> None:
    """cu starts at 0, never decreases and ends at the packed length."""
    _require(cu, lambda c: (c[0] == 0) & (c[-1] == total) & (c[1:] >= c[:-1]).all(),
             f"{name} must start at 0, be non-decreasing and end at the packed length", f" {total}")


def check_packed_lengths(cu_q: torch.Tensor, cu_k: torch.Tensor) -> None:
    """Every packed sequence has at least as many keys as queries."""
    _require(cu_q, lambda c: ((c[1:] - c[:-1]) <= (cu_k[1:] - cu_k[:-1])).all(),
             "every packed sequence needs at least as many keys as queries")


def check_seqused_k_values(seqused_k: torch.Tensor, low: int, high: int, why: str) -> None:
    """low <= every seqused_k <= high."""
    mode = value_checks(seqused_k)
    if mode == "off":
        return
    if mode == "assert":  # no shape in the message (see check_cu_seqlens_values)
        torch._assert_async(((seqused_k >= low) & (seqused_k <= high)).all(),
                            f"longrope_triton: seqused_k must lie between its bounds ({why})")
        return
    lo, hi = _host_values(seqused_k.min(), seqused_k.max())
    if lo < low or hi > high:
        raise ValueError(f"seqused_k must lie in [{low}, {high}] ({why}), got values in [{lo}, {hi}]")

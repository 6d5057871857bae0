"""apply_rotary: LongRoPE rotation of q and k — launcher, custom op with autograd, public function."""

from __future__ import annotations

from typing import Optional

import torch
import triton

from . import reference
from . import _dispatch
from ._dispatch import use_kernel
from ._validation import (check_config, check_heads, check_position_range, check_positions,
                          check_same, check_seq_len)
from .config import LongRoPEConfig
from .kernels.rotary import rotary_kernel
from .tables import SET_LONG, SET_SHORT, cached_tables


# ---------------------------------------------------------------------------- config <-> op args
# torch.library ops take only tensors and primitives, so a config travels as these fields.
def rope_args(cfg: LongRoPEConfig) -> dict:
    """The config as primitive keyword arguments of the custom ops (each regime's mscale resolved)."""
    return dict(head_dim=cfg.head_dim, rotary_dim=cfg.rotary_dim, base=cfg.base,
                original_max=cfg.original_max_position_embeddings, max_pos=cfg.max_position_embeddings,
                short_factor=list(cfg.short_factor), long_factor=list(cfg.long_factor),
                start_token=cfg.start_token, short_mscale=cfg.regime_mscale(False),
                long_mscale=cfg.regime_mscale(True), interleaved=cfg.interleaved)


def config_from_args(head_dim, rotary_dim, base, original_max, max_pos, short_factor, long_factor,
                     start_token, short_mscale, long_mscale, interleaved) -> LongRoPEConfig:
    """The config back from rope_args; both regimes carry their resolved mscale (regime_mscale)."""
    return LongRoPEConfig(head_dim=head_dim, rotary_dim=rotary_dim, base=base,
                          original_max_position_embeddings=original_max, max_position_embeddings=max_pos,
                          short_factor=short_factor, long_factor=long_factor, start_token=start_token,
                          interleaved=interleaved, short_mscale=short_mscale, long_mscale=long_mscale)


def rope_tables(cfg: LongRoPEConfig, device) -> torch.Tensor:
    """The split-position cos/sin tables of this config on ``device`` (cached)."""
    return cached_tables(cfg.base, cfg.rotary_dim, cfg.max_position_embeddings, cfg.short_factor,
                         cfg.long_factor, cfg.regime_mscale(False), cfg.regime_mscale(True), device)


def resolve_positions(cfg: LongRoPEConfig, position_ids: Optional[torch.Tensor], batch: int, seq: int,
                      device, start: int = 0):
    """(B, S) int64 positions (default arange(start, start + seq)) and max(position) + 1, validated."""
    if position_ids is None:
        end = start + seq
        if end > cfg.max_position_embeddings:
            raise ValueError(f"sequence reaches position {end - 1}, past max_position_embeddings "
                             f"({cfg.max_position_embeddings}) of the config")
        return reference.broadcast_positions(None, batch, seq, device, start), end
    pos = reference.broadcast_positions(position_ids, batch, seq, device)
    return pos, check_position_range(pos, cfg.max_position_embeddings)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """PyTorch-path arithmetic: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------- launcher
def _rotary_block_size(seq: int) -> int:
    return min(32, triton.next_power_of_2(max(seq, 1)))


def regime_sets(long: bool, batch: int, seq: int, device) -> torch.Tensor:
    """The (batch, seq) int32 table set of every row for one regime: a stride-0 view of one value."""
    return torch.full((1, 1), SET_LONG if long else SET_SHORT, dtype=torch.int32, device=device).expand(batch, seq)


def launch_rotary(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, sets: torch.Tensor, cfg: LongRoPEConfig,
                  conjugate: bool, q_out: Optional[torch.Tensor] = None, k_out: Optional[torch.Tensor] = None):
    """Rotate q and k with the Triton kernel (one launch). pos and sets: (batch or 1, seq) positions
    and table sets. Outputs default to new tensors in the inputs' layout and dtype; given outputs
    may have another dtype or be the inputs themselves (in place)."""
    batch, n_hq, seq, head_dim = q.shape
    q_out = torch.empty_like(q) if q_out is None else q_out
    k_out = torch.empty_like(k) if k_out is None else k_out
    tables = rope_tables(cfg, q.device)
    block_s = _rotary_block_size(seq)
    pass_dim = head_dim - cfg.rotary_dim
    args = (q, k, q_out, k_out, pos, sets, tables, tables.shape[2], cfg.start_token, seq, head_dim, n_hq, k.shape[1],
            *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), *pos.stride(), *sets.stride())
    meta = dict(ROTARY_DIM=cfg.rotary_dim, BLOCK_S=block_s, BLOCK_HALF=triton.next_power_of_2(cfg.rotary_dim // 2),
                BLOCK_PASS=triton.next_power_of_2(pass_dim) if pass_dim else 0, INTERLEAVED=cfg.interleaved,
                CONJUGATE=conjugate, num_warps=4)
    _dispatch.launch("rotary", rotary_kernel, (triton.cdiv(seq, block_s), batch), args, meta)
    return q_out, k_out


def torch_rotary(x: torch.Tensor, pos: torch.Tensor, cfg: LongRoPEConfig, long: bool, conjugate: bool = False):
    """PyTorch path: float64 angles (the reference), arithmetic in compute_dtype, output in x.dtype."""
    cos, sin = reference.rope_cos_sin(cfg, pos, long)
    dtype = compute_dtype(x.dtype)
    return reference.rotate(x, cos[:, None].to(dtype), sin[:, None].to(dtype), cfg, conjugate).to(x.dtype)


# ---------------------------------------------------------------------------- custom op + autograd
@torch.library.custom_op("longrope_triton::rotary", mutates_args=())
def _rotary_op(q: torch.Tensor, k: torch.Tensor, position_ids: Optional[torch.Tensor], seq_len: Optional[int],
               conjugate: bool, head_dim: int, rotary_dim: int, base: float, original_max: int, max_pos: int,
               short_factor: list[float], long_factor: list[float], start_token: int, short_mscale: float,
               long_mscale: float, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = config_from_args(head_dim, rotary_dim, base, original_max, max_pos, short_factor, long_factor,
                           start_token, short_mscale, long_mscale, interleaved)
    batch, _, seq, _ = q.shape
    pos, end = resolve_positions(cfg, position_ids, batch, seq, q.device)
    long = cfg.use_long(end if seq_len is None else seq_len)
    if use_kernel(q):
        return launch_rotary(q, k, pos, regime_sets(long, batch, seq, q.device), cfg, conjugate)
    return torch_rotary(q, pos, cfg, long, conjugate), torch_rotary(k, pos, cfg, long, conjugate)


@_rotary_op.register_fake
def _(q, k, position_ids, seq_len, conjugate, *rope):
    return torch.empty_like(q), torch.empty_like(k)


def _rotary_setup_context(ctx, inputs, output):
    q, k, position_ids, *rest = inputs
    ctx.save_for_backward(position_ids)
    ctx.rest = rest
    ctx.shapes = (q, k)


def _rotary_backward(ctx, grad_q, grad_k):
    # The rotation is orthogonal up to mscale, so its backward is the conjugate rotation.
    (position_ids,) = ctx.saved_tensors
    seq_len, conjugate, *rope = ctx.rest
    grad_q = torch.zeros_like(ctx.shapes[0]) if grad_q is None else grad_q
    grad_k = torch.zeros_like(ctx.shapes[1]) if grad_k is None else grad_k
    dq, dk = _rotary_op(grad_q, grad_k, position_ids, seq_len, not conjugate, *rope)
    return (dq, dk) + (None,) * (len(ctx.rest) + 1)


_rotary_op.register_autograd(_rotary_backward, setup_context=_rotary_setup_context)


# ---------------------------------------------------------------------------- public function
def apply_rotary(q: torch.Tensor, k: torch.Tensor, cfg: LongRoPEConfig,
                 position_ids: Optional[torch.Tensor] = None, seq_len: Optional[int] = None):
    """Rotate q and k with LongRoPE (per-frequency factors, n_hat bypass, short/long switch, mscale).

    Args:
        q: (batch, q_heads, seq, head_dim), any strides (a (B, S, H, D) tensor's ``.transpose(1, 2)``
            works without a copy); float16, bfloat16, float32 (float64 on CPU).
        k: (batch, k_heads, seq, head_dim), same dtype and device as q; k_heads may differ from q_heads.
        cfg: the LongRoPEConfig.
        position_ids: int tensor (seq,) or (batch, seq); default arange(seq).
        seq_len: the length that picks short vs long factors; default max(position_ids) + 1.

    Returns:
        (q_rot, k_rot), new tensors in the inputs' dtype and layout. Differentiable in q and k.
        CUDA tensors run the Triton kernel; CPU tensors the PyTorch path (or the kernel under
        TRITON_INTERPRET=1).

    Example:
        >>> cfg = LongRoPEConfig(head_dim=64, original_max_position_embeddings=4096,
        ...                      max_position_embeddings=16384, long_factor=[4.0] * 32)
        >>> q, k = torch.randn(1, 8, 128, 64), torch.randn(1, 2, 128, 64)
        >>> q_rot, k_rot = apply_rotary(q, k, cfg, position_ids=torch.arange(8000, 8128))
    """
    check_config(cfg)
    check_heads("q", q, cfg)
    check_heads("k", k, cfg)
    check_same("q and k", q, k)
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must share batch and seq, got {tuple(q.shape)} and {tuple(k.shape)}")
    position_ids = check_positions("position_ids", position_ids, q.shape[0], q.shape[2], q.device)
    seq_len = check_seq_len(seq_len)
    return _rotary_op(q, k, position_ids, seq_len, False, **rope_args(cfg))

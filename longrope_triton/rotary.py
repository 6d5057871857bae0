"""apply_rotary: LongRoPE rotation of q and k — launcher, custom op with autograd, public function."""

from __future__ import annotations

from typing import Optional

import torch
import triton

from . import reference
from . import _dispatch
from ._dispatch import use_kernel
from ._validation import (check_config, check_default_positions, check_heads, check_position_values,
                          check_positions, check_same, check_seq_len, check_use_long)
from .config import LongRoPEConfig
from .kernels.rotary import rotary_kernel
from .tables import SET_LONG, SET_SHORT, SET_UNSCALED, cached_tables


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


def resolve_positions(position_ids: Optional[torch.Tensor], batch: int, seq: int, device, start=0) -> torch.Tensor:
    """(B, S) int64 positions, default arange(start, start + seq) (``start`` may be a (B, 1) tensor).
    Values are not checked here: the public functions check them once (_validation)."""
    if position_ids is None and isinstance(start, torch.Tensor):
        return start.to(torch.int64) + torch.arange(seq, device=device)
    return reference.broadcast_positions(position_ids, batch, seq, device, start)


def positions_end(pos: torch.Tensor):
    """max(position) + 1 of ``pos`` as a 0-d device tensor (0 when empty): never read on the host."""
    if pos.numel() == 0:
        return pos.new_zeros(())
    return pos.amax() + 1


def regime_of(cfg: LongRoPEConfig, end=None, seq_len: Optional[int] = None,
              use_long: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """The table set (1 short, 2 long) as an int32 tensor, decided where its inputs live: from the
    caller's per-sequence ``use_long`` (bool tensor, any shape), else the host ``seq_len``, else
    ``end`` = max(position) + 1 (a host int, or a device tensor: then on the device, never read
    back). The rule is DESIGN §1's: long iff the length > original_max_position_embeddings."""
    if use_long is not None:
        return torch.where(use_long, SET_LONG, SET_SHORT).to(torch.int32)
    if seq_len is not None or not isinstance(end, torch.Tensor):
        length = end if seq_len is None else seq_len
        return torch.full((), SET_LONG if cfg.use_long(length) else SET_SHORT, dtype=torch.int32, device=device)
    return torch.where(end > cfg.original_max_position_embeddings, SET_LONG, SET_SHORT).to(torch.int32)


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


def torch_cos_sin(cfg: LongRoPEConfig, pos: torch.Tensor, sets: torch.Tensor):
    """PyTorch path: float64 mscale * cos / sin (..., r/2) of positions ``pos`` with per-position table
    sets ``sets`` (1 short, 2 long; broadcastable to pos), as the kernels index them: positions below
    n_hat take the unscaled set and mscale 1. The same float64 products as reference.rope_cos_sin."""
    inv_freq = torch.stack([reference.base_inv_freq(cfg, pos.device), reference.scaled_inv_freq(cfg, False, pos.device),
                            reference.scaled_inv_freq(cfg, True, pos.device)])
    mscale = torch.tensor([1.0, cfg.regime_mscale(False), cfg.regime_mscale(True)], dtype=torch.float64,
                          device=pos.device)
    sets = torch.where(pos < cfg.start_token, SET_UNSCALED, sets.to(torch.int64))
    phi = pos.to(torch.float64)[..., None] * inv_freq[sets]
    m = mscale[sets][..., None]
    return m * torch.cos(phi), m * torch.sin(phi)


def torch_rotary(x: torch.Tensor, pos: torch.Tensor, sets: torch.Tensor, cfg: LongRoPEConfig,
                 conjugate: bool = False) -> torch.Tensor:
    """PyTorch path: rotate x (B, H, S, D) at positions ``pos`` (B or 1, S) with table sets ``sets``
    (broadcastable to pos); float64 angles (the reference), arithmetic in compute_dtype, output in
    x.dtype. Vectorized over rows and sequences: no host read."""
    cos, sin = torch_cos_sin(cfg, pos, sets)
    dtype = compute_dtype(x.dtype)
    return reference.rotate(x, cos[:, None].to(dtype), sin[:, None].to(dtype), cfg, conjugate).to(x.dtype)


# ---------------------------------------------------------------------------- custom op + autograd
def rotary_plan(cfg: LongRoPEConfig, position_ids: Optional[torch.Tensor], seq_len: Optional[int],
                use_long: Optional[torch.Tensor], batch: int, seq: int, device):
    """(positions (B, S) int64, table sets broadcastable to (B, S) int32) of an apply_rotary call: the
    regime of the whole batch from max(position) + 1 (or seq_len), or the caller's use_long per row
    (batch,) or per token (batch, seq); decided on the device, never read back."""
    pos = resolve_positions(position_ids, batch, seq, device)
    if use_long is not None and use_long.dim() == 1:
        use_long = use_long[:, None]
    end = seq if position_ids is None else positions_end(pos)
    sets = regime_of(cfg, end, seq_len, use_long, device)
    return pos, sets.expand(batch, seq) if sets.dim() == 2 else sets.view(1, 1).expand(batch, seq)


def rotary_impl(q: torch.Tensor, k: torch.Tensor, position_ids: Optional[torch.Tensor], seq_len: Optional[int],
                conjugate: bool, head_dim: int, rotary_dim: int, base: float, original_max: int, max_pos: int,
                short_factor: list[float], long_factor: list[float], start_token: int, short_mscale: float,
                long_mscale: float, interleaved: bool,
                use_long: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary custom op's implementation: (q_rot, k_rot). Reads no tensor value on the host."""
    cfg = config_from_args(head_dim, rotary_dim, base, original_max, max_pos, short_factor, long_factor,
                           start_token, short_mscale, long_mscale, interleaved)
    batch, _, seq, _ = q.shape
    pos, sets = rotary_plan(cfg, position_ids, seq_len, use_long, batch, seq, q.device)
    if use_kernel(q):
        return launch_rotary(q, k, pos, sets, cfg, conjugate)
    return torch_rotary(q, pos, sets, cfg, conjugate), torch_rotary(k, pos, sets, cfg, conjugate)


_rotary_op = torch.library.custom_op("longrope_triton::rotary", rotary_impl, mutates_args=())


@_rotary_op.register_fake
def _(q, k, *args, **kwargs):
    return torch.empty_like(q), torch.empty_like(k)


def _rotary_setup_context(ctx, inputs, output):
    q, k, position_ids, *rest, use_long = inputs
    ctx.save_for_backward(position_ids, use_long)
    ctx.rest = rest  # seq_len, conjugate and the config fields
    ctx.shapes = (q, k)


def _rotary_backward(ctx, grad_q, grad_k):
    # The rotation is orthogonal up to mscale, so its backward is the conjugate rotation (with the
    # same regime: recomputed from the same positions on the device).
    position_ids, use_long = ctx.saved_tensors
    seq_len, conjugate, *rope = ctx.rest
    grad_q = torch.zeros_like(ctx.shapes[0]) if grad_q is None else grad_q
    grad_k = torch.zeros_like(ctx.shapes[1]) if grad_k is None else grad_k
    dq, dk = _rotary_op(grad_q, grad_k, position_ids, seq_len, not conjugate, *rope, use_long=use_long)
    return (dq, dk) + (None,) * (len(ctx.rest) + 2)


_rotary_op.register_autograd(_rotary_backward, setup_context=_rotary_setup_context)


# ---------------------------------------------------------------------------- public function
def apply_rotary(q: torch.Tensor, k: torch.Tensor, cfg: LongRoPEConfig,
                 position_ids: Optional[torch.Tensor] = None, seq_len: Optional[int] = None, *,
                 use_long: Optional[torch.Tensor] = None):
    """Rotate q and k with LongRoPE (per-frequency factors, n_hat bypass, short/long switch, mscale).

    Args:
        q: (batch, q_heads, seq, head_dim), any strides (a (B, S, H, D) tensor's ``.transpose(1, 2)``
            works without a copy); float16, bfloat16, float32 (float64 on CPU).
        k: (batch, k_heads, seq, head_dim), same dtype and device as q; k_heads may differ from q_heads.
        cfg: the LongRoPEConfig.
        position_ids: int tensor (seq,) or (batch, seq); default arange(seq).
        seq_len: the length that picks short vs long factors; default max(position_ids) + 1 over the
            batch, computed on the device (never read back).
        use_long: bool tensor (batch,) -- or (batch, seq), per token, for rows that pack several
            sequences -- True where the long factors apply: the caller's regime (e.g. a serving engine
            that decides it from a request's whole prompt), instead of seq_len and the positions.

    Returns:
        (q_rot, k_rot), new tensors in the inputs' dtype and layout. Differentiable in q and k.
        CUDA tensors run the Triton kernel; CPU tensors the PyTorch path (or the kernel under
        TRITON_INTERPRET=1). No device->host read unless eager value checks are on (the default:
        one read to check the positions; see docs/compile.md).

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
    batch, seq = q.shape[0], q.shape[2]
    if batch != k.shape[0] or seq != k.shape[2]:
        raise ValueError(f"q and k must share batch and seq, got {tuple(q.shape)} and {tuple(k.shape)}")
    position_ids = check_positions("position_ids", position_ids, batch, seq, q.device)
    seq_len = check_seq_len(seq_len)
    use_long = check_use_long(use_long, ((batch,), (batch, seq)), "one per batch row, or per token", q.device)
    if position_ids is None:
        check_default_positions(seq, cfg.max_position_embeddings)
    else:
        check_position_values("position_ids", position_ids, cfg.max_position_embeddings)
    return _rotary_op(q, k, position_ids, seq_len, False, **rope_args(cfg), use_long=use_long)

"""fused_rope_attention: LongRoPE rotation inside FlashAttention-style attention.

Launchers, the custom op with autograd, the PyTorch path for CPU tensors, and the
public function. The Triton kernels are in kernels/attention_fwd.py and
kernels/attention_bwd.py; they share the rotation code of kernels/rotary.py.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton

from . import reference
from . import _dispatch
from ._dispatch import use_kernel
from ._validation import (check_config, check_gqa, check_heads, check_position_range, check_positions,
                          check_same, check_seq_len)
from .config import LongRoPEConfig
from .decode import DECODE_MAX_QUERIES, decode_forward
from .rotary import (compute_dtype, config_from_args, launch_rotary, regime_sets, resolve_positions, rope_args,
                     torch_rotary)
from .kernels.attention_bwd import (attention_bwd_dkdv_kernel, attention_bwd_dq_kernel,
                                    attention_bwd_preprocess_kernel)
from .kernels.attention_fwd import attention_fwd_kernel
from .tables import SET_LONG, SET_SHORT

# Query rows per chunk of the PyTorch path: bounds its memory at ~chunk x Sk scores per head.
_TORCH_CHUNK = 1024


# ---------------------------------------------------------------------------- positions and regimes
def _varlen_positions(cu_seqlens: torch.Tensor, total: int, bottom_right_lens: Optional[torch.Tensor] = None):
    """Per-sequence arange positions (1, total) for packed sequences; a query row of sequence b
    sits at position (len_k_b - len_q_b) + i so causal masking stays bottom-right aligned."""
    idx = torch.arange(total, device=cu_seqlens.device)
    seq_id = torch.searchsorted(cu_seqlens[1:], idx, right=True)
    pos = idx - cu_seqlens[seq_id]
    if bottom_right_lens is not None:
        pos = pos + bottom_right_lens[seq_id]
    return pos[None]


def _segment_max(pos: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """max(position) + 1 per packed sequence, int64 (n_seqs,); 0 for empty sequences."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    seq_id = torch.repeat_interleave(torch.arange(len(lengths), device=pos.device), lengths)
    out = torch.zeros(len(lengths), dtype=torch.int64, device=pos.device)
    return out.scatter_reduce(0, seq_id, pos[0, : int(cu_seqlens[-1])] + 1, reduce="amax")


class _Plan:
    """Everything the kernels and the PyTorch path need besides q, k, v: validated int64
    positions, the table set (1 short, 2 long) of each sequence and of each q and k row,
    the sequence bounds, and whether q and k share their positions (one conjugate launch)."""

    def __init__(self, cfg, q, k, position_ids, kv_position_ids, cu_seqlens_q, cu_seqlens_k, seq_len):
        batch, _, sq, _ = q.shape
        sk = k.shape[2]
        self.varlen = cu_seqlens_q is not None
        if self.varlen:
            lens_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
            lens_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
            if bool((lens_q > lens_k).any()):
                raise ValueError("every packed sequence needs at least as many keys as queries")
            self.q_pos = (_varlen_positions(cu_seqlens_q, sq, lens_k - lens_q) if position_ids is None
                          else position_ids.expand(1, sq).to(torch.int64))
            self.k_pos = (_varlen_positions(cu_seqlens_k, sk) if kv_position_ids is None
                          else kv_position_ids.expand(1, sk).to(torch.int64))
            check_position_range(self.q_pos, cfg.max_position_embeddings)
            check_position_range(self.k_pos, cfg.max_position_embeddings)
            ends = torch.maximum(_segment_max(self.q_pos, cu_seqlens_q), _segment_max(self.k_pos, cu_seqlens_k))
            if seq_len is not None:
                ends = torch.full_like(ends, seq_len)
            self.seq_sets = torch.where(ends > cfg.original_max_position_embeddings, SET_LONG, SET_SHORT).int()
            self.cu_q, self.cu_k = cu_seqlens_q, cu_seqlens_k
            self.n_seqs = len(lens_q)
            self.max_q, self.max_k = int(lens_q.max()), int(lens_k.max())
            self.q_sets = self.seq_sets.repeat_interleave(lens_q, output_size=sq)[None]
            self.k_sets = self.seq_sets.repeat_interleave(lens_k, output_size=sk)[None]
            self.shared_positions = (position_ids is None and kv_position_ids is None
                                     and cu_seqlens_q is cu_seqlens_k)
        else:
            self.q_pos, end_q = resolve_positions(cfg, position_ids, batch, sq, q.device, start=sk - sq)
            self.k_pos, end_k = resolve_positions(cfg, kv_position_ids, batch, sk, q.device)
            long = cfg.use_long(max(end_q, end_k) if seq_len is None else seq_len)
            self.seq_sets = torch.full((batch,), SET_LONG if long else SET_SHORT, dtype=torch.int32,
                                       device=q.device)
            self.q_sets, self.k_sets = regime_sets(long, batch, sq, q.device), regime_sets(long, batch, sk, q.device)
            self.cu_q = self.cu_k = None
            self.n_seqs, self.max_q, self.max_k = batch, sq, sk
            self.shared_positions = sq == sk and position_ids is kv_position_ids

    def sequences(self):
        """(batch index, q slice, k slice, long?) for every sequence, for the PyTorch path."""
        for b in range(self.n_seqs):
            long = int(self.seq_sets[b]) == SET_LONG
            if self.varlen:
                q0, q1, k0, k1 = (int(self.cu_q[b]), int(self.cu_q[b + 1]), int(self.cu_k[b]), int(self.cu_k[b + 1]))
                yield 0, slice(q0, q1), slice(k0, k1), long
            else:
                yield b, slice(None), slice(None), long


# ---------------------------------------------------------------------------- PyTorch path
def _torch_sdpa(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    """softmax attention with GQA, bottom-right causal, chunked over queries (memory ~chunk x Sk)."""
    sq, sk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if not causal or sq == sk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    offset = sk - sq
    first_row = max(0, -offset)  # rows before it see no key: zeros, as flash-attn
    for a in range(first_row, sq, _TORCH_CHUNK):
        b = min(a + _TORCH_CHUNK, sq)
        end = b + offset
        mask = reference.causal_mask(sq, sk, q.device)[a:b, :end]
        out[..., a:b, :] = F.scaled_dot_product_attention(
            q[..., a:b, :], k[..., :end, :], v[..., :end, :], attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out


def _torch_rotate_into(out, x, cfg, pos, long, b, rows, conjugate=False):
    """Rotate one sequence's rows of x (the PyTorch rotary path) and write them, rounded, into out."""
    out[b:b + 1, :, rows] = torch_rotary(x[b:b + 1, :, rows], pos[min(b, len(pos) - 1), rows][None], cfg, long,
                                         conjugate)


def torch_attention(q, k, v, cfg: LongRoPEConfig, plan: _Plan, causal: bool, scale: float,
                    rotate_q: bool, rotate_k: bool):
    """PyTorch path with the kernels' convention: q and k rotated once (float64 angles) and rounded
    to the input dtype, then attention in compute_dtype. Returns (out, q_rot, k_rot)."""
    dtype = compute_dtype(q.dtype)
    q_rot = torch.empty_like(q) if rotate_q else q
    k_rot = torch.empty_like(k) if rotate_k else k
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    for b, qs, ks, long in plan.sequences():
        if rotate_q:
            _torch_rotate_into(q_rot, q, cfg, plan.q_pos, long, b, qs)
        if rotate_k:
            _torch_rotate_into(k_rot, k, cfg, plan.k_pos, long, b, ks)
        qb, kb, vb = (t[b:b + 1, :, rows].to(dtype) for t, rows in ((q_rot, qs), (k_rot, ks), (v, ks)))
        out[b:b + 1, :, qs] = _torch_sdpa(qb, kb, vb, causal, scale).to(q.dtype)
    return out, q_rot, k_rot


def torch_attention_backward(grad_out, q_rot, k_rot, v, grad_k_rot, cfg: LongRoPEConfig, plan: _Plan,
                             causal: bool, scale: float, rotate_q: bool, rotate_k: bool):
    """PyTorch-path gradients (the FlashAttention-2 formulas, chunked over query rows) on the rotated
    operands: dV = P^T dO, dS = P (dO V^T - rowsum(dO O)), dQ = scale dS K, dK = scale dS^T Q in the
    rotated space (plus grad_k_rot, the gradient reaching returned rotated keys, or None), then the
    conjugate rotation back; GQA gradients summed over each group."""
    dtype = compute_dtype(q_rot.dtype)
    dq, dk, dv = torch.zeros_like(q_rot), torch.zeros_like(k_rot), torch.zeros_like(v)
    dq_rot = torch.zeros(q_rot.shape, dtype=dtype, device=q_rot.device)
    dk_rot = torch.zeros(k_rot.shape, dtype=dtype, device=k_rot.device)
    group = q_rot.shape[1] // k_rot.shape[1]
    fold = lambda t: t.unflatten(1, (-1, group)).sum(2)  # noqa: E731 - sum each GQA group
    for b, qs, ks, long in plan.sequences():
        qb = q_rot[b:b + 1, :, qs].to(dtype)
        kb, vb = (t[b:b + 1, :, ks].to(dtype).repeat_interleave(group, 1) for t in (k_rot, v))
        dob = grad_out[b:b + 1, :, qs].to(dtype)
        sq, sk = qb.shape[2], kb.shape[2]
        dkb, dvb = torch.zeros_like(kb), torch.zeros_like(vb)
        rows = max(16, (1 << 24) // max(1, sk * qb.shape[1]))
        for a in range(0, sq, rows):
            e = min(a + rows, sq)
            s = torch.matmul(qb[:, :, a:e], kb.transpose(-1, -2)) * scale
            if causal:
                s = s.masked_fill(~reference.causal_mask(sq, sk, q_rot.device)[a:e], float("-inf"))
            p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
            do_c = dob[:, :, a:e]
            delta = (do_c * torch.matmul(p, vb)).sum(-1, keepdim=True)
            dvb += torch.matmul(p.transpose(-1, -2), do_c)
            ds = p * (torch.matmul(do_c, vb.transpose(-1, -2)) - delta)
            dq_rot[b:b + 1, :, qs][:, :, a:e] = torch.matmul(ds, kb) * scale
            dkb += torch.matmul(ds.transpose(-1, -2), qb[:, :, a:e]) * scale
        dk_rot[b:b + 1, :, ks] = fold(dkb)
        if grad_k_rot is not None:
            dk_rot[b:b + 1, :, ks] += grad_k_rot[b:b + 1, :, ks]
        dv[b:b + 1, :, ks] = fold(dvb).to(v.dtype)
        for grad_rot, grad, pos, rows, rotate in ((dq_rot, dq, plan.q_pos, qs, rotate_q),
                                                  (dk_rot, dk, plan.k_pos, ks, rotate_k)):
            if rotate:
                _torch_rotate_into(grad, grad_rot, cfg, pos, long, b, rows, conjugate=True)
            else:
                grad[b:b + 1, :, rows] = grad_rot[b:b + 1, :, rows].to(grad.dtype)
    return dq, dk, dv


# ---------------------------------------------------------------------------- Triton launchers
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and row class (the bytes of one q, k or v
# row: BLOCK_D x element size). With rotation out of the loops these are plain FlashAttention-2
# kernels; every tile listed compiles for sm_90 with no register spill and within the shared
# memory of an H100 block, and tests/test_compile_budget.py keeps it that way
# (scripts/compile_check.py, docs/kernels.md).
_TILES = {
    "fwd": {128: [(128, 64, 8, 3), (64, 64, 4, 3)],
            256: [(128, 64, 8, 3), (128, 64, 8, 2)],
            512: [(32, 64, 4, 2)],
            1024: [(16, 32, 4, 2)]},
    "dkdv": {128: [(32, 128, 8, 3), (16, 128, 8, 2)],
             256: [(16, 128, 8, 2), (64, 32, 8, 2)],
             512: [(32, 32, 8, 2), (16, 32, 8, 1)],
             1024: [(16, 16, 4, 2)]},
    "dq": {128: [(128, 64, 8, 3), (64, 64, 4, 3)],
           256: [(128, 64, 8, 2), (64, 64, 8, 2)],
           512: [(32, 64, 8, 2), (64, 32, 8, 2)],
           1024: [(16, 32, 4, 2)]},
}


def row_class(block_d: int, element_size: int) -> int:
    """The tile class of a launch: bytes of one row, rounded up to a class of _TILES."""
    return max(128, min(1024, block_d * element_size))


def _autotuned(kernel, tiles, key):
    """The kernel autotuned over its tiles; launch-time pruning keeps those of the row class."""
    configs = {cls: [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in t]
               for cls, t in tiles.items()}

    def keep_row_class(all_configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        tiles = configs[row_class(args["BLOCK_D"], args["p_q"].element_size())]
        return tiles[:1] if _dispatch.pinned_tiles() else tiles

    return triton.autotune([c for cs in configs.values() for c in cs], key=key,
                           prune_configs_by={"early_config_prune": keep_row_class})(kernel)


# Keys are constexpr dims and flags only (sequence lengths are not specialized either), so a new
# length never retunes or recompiles; the dtype is part of Triton's own cache key.
_fwd_tuned = _autotuned(attention_fwd_kernel, _TILES["fwd"], ["BLOCK_D", "CAUSAL", "IS_VARLEN"])
_dkdv_tuned = _autotuned(attention_bwd_dkdv_kernel, _TILES["dkdv"], ["BLOCK_D", "CAUSAL", "IS_VARLEN"])
_dq_tuned = _autotuned(attention_bwd_dq_kernel, _TILES["dq"], ["BLOCK_D", "CAUSAL", "IS_VARLEN"])
# The interpreter cannot time configs: it runs one fixed tile, small enough to exercise edges.
_INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}


def _launch(name, kernel, tuned, grid, args, meta):
    _dispatch.launch(name, kernel, grid, args, meta, tuned=tuned, interpret_meta=_INTERPRET_BLOCKS)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _common_meta(q, causal, plan):
    return dict(BLOCK_D=_block_d(q.shape[-1]), CAUSAL=causal, IS_VARLEN=plan.varlen,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _bounds(plan):
    """cu_seqlens pointers (any int tensor when not packed: the kernels do not read them)."""
    return (plan.cu_q, plan.cu_k) if plan.varlen else (plan.seq_sets, plan.seq_sets)


def rotate_once(q, k, cfg, plan, rotate_q, rotate_k, conjugate=False, q_out=None, k_out=None):
    """q and k rotated by the rotary kernel (O(N d), once per token) with the plan's positions and
    table sets, into q_out / k_out when given: one launch when they share positions
    (self-attention), else one each. An input that is not rotated comes back as it is."""
    if rotate_q and rotate_k and plan.shared_positions:
        return launch_rotary(q, k, plan.q_pos, plan.q_sets, cfg, conjugate, q_out, k_out)
    if rotate_q:
        q = launch_rotary(q, q[:, :0], plan.q_pos, plan.q_sets, cfg, conjugate, q_out)[0]
    if rotate_k:
        k = launch_rotary(k[:, :0], k, plan.k_pos, plan.k_sets, cfg, conjugate, k_out=k_out)[1]
    return q, k


def attention_forward(q, k, v, cfg, plan, causal, softmax_scale, rotate_q, rotate_k):
    """Triton forward: (out, lse, q_rot, k_rot). out in q's layout and dtype; lse float32 (B, Hq, Sq),
    base 2 of the scaled scores; q_rot / k_rot the rotated inputs (what the backward reads and a KV
    cache stores), each an empty tensor when that input is not rotated. A few query rows (a decode
    step) take the split-KV kernels of decode.py, whose out and lse the same backward reads."""
    q_rot, k_rot = rotate_once(q, k, cfg, plan, rotate_q, rotate_k)
    if not plan.varlen and q.shape[2] <= DECODE_MAX_QUERIES:
        out, lse = decode_forward(q_rot, k_rot, v, causal, softmax_scale)
    else:
        out, lse = _prefill_forward(q_rot, k_rot, v, plan, causal, softmax_scale)
    return out, lse, q_rot if rotate_q else q.new_empty(0), k_rot if rotate_k else q.new_empty(0)


def _prefill_forward(q_rot, k_rot, v, plan, causal, softmax_scale):
    """The FlashAttention-2 forward kernel on rotated q and k: (out, lse)."""
    out = torch.empty_like(q_rot)
    lse = torch.empty(q_rot.shape[:-1], dtype=torch.float32, device=q_rot.device)
    args = (q_rot, k_rot, v, out, lse, *_bounds(plan), softmax_scale * 1.4426950408889634, q_rot.shape[2],
            k_rot.shape[2], q_rot.shape[3], q_rot.shape[1] // k_rot.shape[1],
            *q_rot.stride(), *k_rot.stride(), *v.stride(), *out.stride(), *lse.stride())
    grid = lambda m: (triton.cdiv(plan.max_q, m["BLOCK_M"]), plan.n_seqs, q_rot.shape[1])  # noqa: E731
    _launch("attention forward", attention_fwd_kernel, _fwd_tuned, grid, args, _common_meta(q_rot, causal, plan))
    return out, lse


def _gradient_buffer(x, rotated: bool):
    """Where a dq/dk kernel writes: the gradient itself when no rotation follows, else an fp32
    buffer the conjugate pass reads (in place for fp32), so the gradient is rounded once."""
    grad = torch.empty_like(x)
    if rotated and x.dtype != torch.float32:
        return grad, torch.empty(x.shape, dtype=torch.float32, device=x.device)
    return grad, grad


def attention_backward(grad_out, q_rot, k_rot, v, out, lse, grad_k_rot, cfg, plan, causal, softmax_scale,
                       rotate_q, rotate_k):
    """Triton backward on the rotated operands: (dq, dk, dv) in the inputs' layouts and dtypes.
    grad_k_rot: the gradient reaching the rotated keys the forward returned (or None)."""
    batch, n_hq, sq, head_dim = q_rot.shape
    delta = torch.empty((batch, n_hq, sq), dtype=torch.float32, device=q_rot.device)
    _dispatch.launch("attention backward preprocess", attention_bwd_preprocess_kernel,
                     (triton.cdiv(sq, 64), batch, n_hq), (out, grad_out, delta, sq, head_dim, *out.stride(),
                                                          *grad_out.stride()),
                     dict(BLOCK_M=64, BLOCK_DV=_block_d(head_dim)))
    dq, dq_acc = _gradient_buffer(q_rot, rotate_q)
    dk, dk_acc = _gradient_buffer(k_rot, rotate_k)
    dv = torch.empty_like(v)
    meta = _common_meta(q_rot, causal, plan)
    head = (*_bounds(plan), softmax_scale, sq, k_rot.shape[2], head_dim, n_hq // k_rot.shape[1], n_hq, sq)
    strides = (*q_rot.stride(), *k_rot.stride(), *v.stride(), *grad_out.stride())
    _launch("attention backward dK/dV", attention_bwd_dkdv_kernel, _dkdv_tuned,
            lambda m: (triton.cdiv(plan.max_k, m["BLOCK_N"]), plan.n_seqs, k_rot.shape[1]),
            (q_rot, k_rot, v, grad_out, lse, delta, dk_acc, dv, *head, *strides, *dk_acc.stride(), *dv.stride(),
             *lse.stride()), meta)
    _launch("attention backward dQ", attention_bwd_dq_kernel, _dq_tuned,
            lambda m: (triton.cdiv(plan.max_q, m["BLOCK_M"]), plan.n_seqs, n_hq),
            (q_rot, k_rot, v, grad_out, lse, delta, dq_acc, *head, *strides, *dq_acc.stride(), *lse.stride()), meta)
    if grad_k_rot is not None:
        dk_acc += grad_k_rot
    # Back to the caller's space: the conjugate rotation, once per token.
    rotate_once(dq_acc, dk_acc, cfg, plan, rotate_q, rotate_k, conjugate=True, q_out=dq, k_out=dk)
    return dq, dk, dv


# ---------------------------------------------------------------------------- custom op + autograd
@torch.library.custom_op("longrope_triton::fused_rope_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: Optional[torch.Tensor],
                  kv_position_ids: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                  cu_seqlens_k: Optional[torch.Tensor], causal: bool, softmax_scale: float,
                  seq_len: Optional[int], rotate_q: bool, rotate_k: bool, head_dim: int,
                  rotary_dim: int, base: float, original_max: int, max_pos: int, short_factor: list[float],
                  long_factor: list[float], start_token: int, short_mscale: float, long_mscale: float,
                  interleaved: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, lse, q_rot, k_rot). lse (base-2 log-sum-exp, float32) feeds the kernel backward
    (the PyTorch path recomputes and returns zeros). q_rot / k_rot: the rotated q / k when rotated,
    else empty tensors."""
    cfg = config_from_args(head_dim, rotary_dim, base, original_max, max_pos, short_factor, long_factor,
                           start_token, short_mscale, long_mscale, interleaved)
    plan = _Plan(cfg, q, k, position_ids, kv_position_ids, cu_seqlens_q, cu_seqlens_k, seq_len)
    if use_kernel(q):
        return attention_forward(q, k, v, cfg, plan, causal, softmax_scale, rotate_q, rotate_k)
    out, q_rot, k_rot = torch_attention(q, k, v, cfg, plan, causal, softmax_scale, rotate_q, rotate_k)
    return (out, q.new_zeros(q.shape[:-1], dtype=torch.float32), q_rot if rotate_q else q.new_empty(0),
            k_rot if rotate_k else q.new_empty(0))


@_attention_op.register_fake
def _(q, k, v, position_ids, kv_position_ids, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, seq_len,
      rotate_q, rotate_k, *rope):
    return (q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty(q.shape[:-1], dtype=torch.float32),
            torch.empty_like(q) if rotate_q else q.new_empty(0),
            torch.empty_like(k) if rotate_k else q.new_empty(0))


@torch.library.custom_op("longrope_triton::fused_rope_attention_backward", mutates_args=())
def _attention_backward_op(grad_out: torch.Tensor, q_rot: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, grad_k_rot: Optional[torch.Tensor],
                           position_ids: Optional[torch.Tensor], kv_position_ids: Optional[torch.Tensor],
                           cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                           causal: bool, softmax_scale: float, seq_len: Optional[int], rotate_q: bool,
                           rotate_k: bool, head_dim: int, rotary_dim: int, base: float,
                           original_max: int, max_pos: int, short_factor: list[float], long_factor: list[float],
                           start_token: int, short_mscale: float, long_mscale: float,
                           interleaved: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = config_from_args(head_dim, rotary_dim, base, original_max, max_pos, short_factor, long_factor,
                           start_token, short_mscale, long_mscale, interleaved)
    plan = _Plan(cfg, q_rot, k_rot, position_ids, kv_position_ids, cu_seqlens_q, cu_seqlens_k, seq_len)
    if use_kernel(q_rot):
        return attention_backward(grad_out, q_rot, k_rot, v, out, lse, grad_k_rot, cfg, plan, causal,
                                  softmax_scale, rotate_q, rotate_k)
    return torch_attention_backward(grad_out, q_rot, k_rot, v, grad_k_rot, cfg, plan, causal, softmax_scale,
                                    rotate_q, rotate_k)


@_attention_backward_op.register_fake
def _(grad_out, q_rot, k_rot, v, *args):
    return torch.empty_like(q_rot), torch.empty_like(k_rot), torch.empty_like(v)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, *rest = inputs
    out, lse, q_rot, k_rot = output
    rotate_q, rotate_k = rest[7], rest[8]  # after 4 tensors, causal, softmax_scale and seq_len
    # The backward runs on the rotated operands: saving them costs what saving q and k would.
    ctx.save_for_backward(q_rot if rotate_q else q, k_rot if rotate_k else k, v, out, lse, *rest[:4])
    ctx.rest = rest[4:]


def _attention_backward(ctx, grad_out, grad_lse, grad_q_rot, grad_k_rot):
    q_rot, k_rot, v, out, lse, *tensors = ctx.saved_tensors
    rotate_k = ctx.rest[4]  # ctx.rest: causal, softmax_scale, seq_len, rotate_q, rotate_k, ...
    grad_k_rot = grad_k_rot if rotate_k and grad_k_rot is not None and grad_k_rot.numel() else None
    dq, dk, dv = _attention_backward_op(grad_out.contiguous(), q_rot, k_rot, v, out, lse, grad_k_rot, *tensors,
                                        *ctx.rest)
    return (dq, dk, dv) + (None,) * (4 + len(ctx.rest))


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


# ---------------------------------------------------------------------------- public functions
def _check_cu_seqlens(name: str, cu, total: int, device) -> Optional[torch.Tensor]:
    if cu is None:
        return None
    if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1:
        raise TypeError(f"{name} must be a 1-D int32/int64 tensor")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the tensors are on {device}")
    if len(cu) < 2 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{name} must start at 0, be non-decreasing and end at the packed length {total}")
    return cu


def fused_rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LongRoPEConfig,
                         position_ids: Optional[torch.Tensor] = None,
                         kv_position_ids: Optional[torch.Tensor] = None, causal: bool = True,
                         softmax_scale: Optional[float] = None, seq_len: Optional[int] = None, *,
                         cu_seqlens: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
                         k_is_rotated: bool = False, return_rotated_k: bool = False):
    """Attention over LongRoPE-rotated q and k, with the rotation fused into the tiled kernel.

    Args:
        q: (batch, q_heads, Sq, head_dim); k, v: (batch, kv_heads, Sk, head_dim), any strides
            (a (B, S, H, D) tensor's ``.transpose(1, 2)`` works without a copy); q_heads % kv_heads == 0.
            float16, bfloat16, float32 (float64 on CPU); one dtype and device for all three.
        cfg: the LongRoPEConfig.
        position_ids: int (Sq,) or (batch, Sq); default arange(Sk - Sq, Sk).
        kv_position_ids: int (Sk,) or (batch, Sk); default arange(Sk).
        causal: bottom-right aligned causal mask (query i sees keys j <= i + Sk - Sq), as flash-attn.
        softmax_scale: default 1 / sqrt(head_dim).
        seq_len: the length that picks short vs long factors; default max(position ids) + 1.
        cu_seqlens: packed sequences (flash-attn convention): batch must be 1 and ``cu_seqlens``
            (n_seqs + 1,) the sequence starts; positions restart per sequence and each sequence
            picks its own regime from its own length. ``cu_seqlens_k`` overrides it for k/v.
        k_is_rotated: k is already rotated (a KV cache); only q is rotated.
        return_rotated_k: also return the rotated keys (to store in a cache).

    Returns:
        out (batch, q_heads, Sq, head_dim) in q's dtype; ``(out, k_rot)`` with return_rotated_k.
        Differentiable in q, k and v.

    Example:
        >>> cfg = LongRoPEConfig(head_dim=64, original_max_position_embeddings=4096,
        ...                      max_position_embeddings=16384, long_factor=[4.0] * 32)
        >>> q, k, v = torch.randn(1, 8, 256, 64), torch.randn(1, 2, 256, 64), torch.randn(1, 2, 256, 64)
        >>> out = fused_rope_attention(q, k, v, cfg, causal=True)
    """
    check_config(cfg)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_heads(name, t, cfg)
    check_same("q, k and v", q, k, v)
    check_gqa(q.shape[1], k.shape[1])
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must share batch, heads and seq, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must share the batch size, got {q.shape[0]} and {k.shape[0]}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(cfg.head_dim)
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not math.isfinite(softmax_scale):
        raise TypeError(f"softmax_scale must be a finite float, got {softmax_scale!r}")
    if k_is_rotated and k.shape[2] < q.shape[2]:
        raise ValueError(f"k_is_rotated: the KV cache holds {k.shape[2]} keys, fewer than the {q.shape[2]} queries "
                         f"(a cache includes the step's own tokens)")
    if k_is_rotated and return_rotated_k:
        raise ValueError("return_rotated_k needs raw keys, but k_is_rotated says k is already rotated")
    cu_seqlens_q = _check_cu_seqlens("cu_seqlens", cu_seqlens, q.shape[2], q.device)
    cu_seqlens_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k if cu_seqlens_k is not None else cu_seqlens,
                                     k.shape[2], q.device)
    if cu_seqlens_q is None and cu_seqlens_k is not None:
        raise ValueError("cu_seqlens_k needs cu_seqlens for the queries")
    if cu_seqlens_q is not None:
        if q.shape[0] != 1:
            raise ValueError(f"packed sequences (cu_seqlens) need batch 1, got {q.shape[0]}")
        if len(cu_seqlens_q) != len(cu_seqlens_k):
            raise ValueError("cu_seqlens and cu_seqlens_k must describe the same number of sequences")
    position_ids = check_positions("position_ids", position_ids, q.shape[0], q.shape[2], q.device)
    kv_position_ids = check_positions("kv_position_ids", kv_position_ids, k.shape[0], k.shape[2], q.device)
    seq_len = check_seq_len(seq_len)
    out, _, _, k_rot = _attention_op(q, k, v, position_ids, kv_position_ids, cu_seqlens_q, cu_seqlens_k, causal,
                                     float(softmax_scale), seq_len, True, not k_is_rotated, **rope_args(cfg))
    return (out, k_rot) if return_rotated_k else out

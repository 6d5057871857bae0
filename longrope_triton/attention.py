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
from ._dispatch import LAUNCH_OPTIONS, kernel_errors, needs_int64, triton_interpret, use_kernel
from ._validation import (check_config, check_gqa, check_heads, check_position_range, check_positions,
                          check_same, check_seq_len)
from .config import LongRoPEConfig
from .rotary import _rotary_op, compute_dtype, config_from_args, resolve_positions, rope_args
from .kernels.attention_bwd import (attention_bwd_dkdv_kernel, attention_bwd_dq_kernel,
                                    attention_bwd_preprocess_kernel)
from .kernels.attention_fwd import attention_fwd_kernel
from .rotary import rope_tables
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
    positions, the table set of each sequence (1 short, 2 long) and the sequence bounds."""

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
            self.seq_sets = torch.where(ends > cfg.original_max_position_embeddings, SET_LONG, SET_SHORT)
            self.cu_q, self.cu_k = cu_seqlens_q, cu_seqlens_k
            self.n_seqs = len(lens_q)
            self.max_q, self.max_k = int(lens_q.max()), int(lens_k.max())
        else:
            self.q_pos, end_q = resolve_positions(cfg, position_ids, batch, sq, q.device, start=sk - sq)
            self.k_pos, end_k = resolve_positions(cfg, kv_position_ids, batch, sk, q.device)
            self.max_position = max(end_q, end_k) - 1
            long = cfg.use_long(max(end_q, end_k) if seq_len is None else seq_len)
            self.seq_sets = torch.full((batch,), SET_LONG if long else SET_SHORT, device=q.device)
            self.cu_q = self.cu_k = None
            self.n_seqs, self.max_q, self.max_k = batch, sq, sk

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


def _torch_sequence(q, k, v, cfg, plan, b, qs, ks, long, rotate_q, rotate_k):
    """One sequence's q, k, v in compute_dtype, rotated as asked, with the cos/sin used (None if not)."""
    dtype = compute_dtype(q.dtype)
    qb, kb, vb = q[b:b + 1, :, qs].to(dtype), k[b:b + 1, :, ks].to(dtype), v[b:b + 1, :, ks].to(dtype)
    q_trig = k_trig = None
    if rotate_q:
        q_trig = [t.to(dtype) for t in reference.rope_cos_sin(cfg, plan.q_pos[min(b, len(plan.q_pos) - 1), qs], long)]
        qb = reference.rotate(qb, *q_trig, cfg)
    if rotate_k:
        k_trig = [t.to(dtype) for t in reference.rope_cos_sin(cfg, plan.k_pos[min(b, len(plan.k_pos) - 1), ks], long)]
        kb = reference.rotate(kb, *k_trig, cfg)
    return qb, kb, vb, q_trig, k_trig


def torch_attention(q, k, v, cfg: LongRoPEConfig, plan: _Plan, causal: bool, scale: float,
                    rotate_q: bool, rotate_k: bool) -> torch.Tensor:
    """PyTorch path: float64 angles, rotation and attention in compute_dtype, output in q.dtype."""
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    for b, qs, ks, long in plan.sequences():
        qb, kb, vb, _, _ = _torch_sequence(q, k, v, cfg, plan, b, qs, ks, long, rotate_q, rotate_k)
        out[b:b + 1, :, qs] = _torch_sdpa(qb, kb, vb, causal, scale).to(q.dtype)
    return out


def torch_attention_backward(grad_out, q, k, v, cfg: LongRoPEConfig, plan: _Plan, causal: bool, scale: float,
                             rotate_q: bool, rotate_k: bool):
    """PyTorch-path gradients (the FlashAttention-2 formulas, chunked over query rows):
    dV = P^T dO, dS = P (dO V^T - rowsum(dO O)), dQ = scale dS K, dK = scale dS^T Q in the rotated
    space, then the conjugate rotation back; GQA gradients summed over each group."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    group = q.shape[1] // k.shape[1]
    for b, qs, ks, long in plan.sequences():
        qb, kb, vb, q_trig, k_trig = _torch_sequence(q, k, v, cfg, plan, b, qs, ks, long, rotate_q, rotate_k)
        kb, vb = kb.repeat_interleave(group, 1), vb.repeat_interleave(group, 1)
        dob = grad_out[b:b + 1, :, qs].to(qb.dtype)
        sq, sk = qb.shape[2], kb.shape[2]
        dqb, dkb, dvb = torch.zeros_like(qb), torch.zeros_like(kb), torch.zeros_like(vb)
        rows = max(16, (1 << 24) // max(1, sk * qb.shape[1]))
        for a in range(0, sq, rows):
            e = min(a + rows, sq)
            s = torch.matmul(qb[:, :, a:e], kb.transpose(-1, -2)) * scale
            if causal:
                s = s.masked_fill(~reference.causal_mask(sq, sk, q.device)[a:e], float("-inf"))
            p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
            do_c = dob[:, :, a:e]
            delta = (do_c * torch.matmul(p, vb)).sum(-1, keepdim=True)
            dvb += torch.matmul(p.transpose(-1, -2), do_c)
            ds = p * (torch.matmul(do_c, vb.transpose(-1, -2)) - delta)
            dqb[:, :, a:e] = torch.matmul(ds, kb) * scale
            dkb += torch.matmul(ds.transpose(-1, -2), qb[:, :, a:e]) * scale
        if rotate_q:
            dqb = reference.rotate(dqb, *q_trig, cfg, conjugate=True)
        if rotate_k:
            dkb = reference.rotate(dkb, *k_trig, cfg, conjugate=True)
        fold = lambda t: t.unflatten(1, (-1, group)).sum(2)  # noqa: E731 - sum each GQA group
        dq[b:b + 1, :, qs] = dqb.to(q.dtype)
        dk[b:b + 1, :, ks] = fold(dkb).to(k.dtype)
        dv[b:b + 1, :, ks] = fold(dvb).to(v.dtype)
    return dq, dk, dv


# ---------------------------------------------------------------------------- Triton launchers
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, for narrow rows (q/k split + v at most
# 256 two-byte elements: head_dim <= 128) and wide rows (head_dim 256, wide partial rotary,
# fp32). Each fits the 227 KB of shared memory of an H100 block: sizes measured with
# scripts/compile_check.py (bf16, sm_90).
_TILES = {
    "fwd": {"narrow": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3), (64, 32, 4, 2)],
            "wide": [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)]},
    "dkdv": {"narrow": [(64, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1)],
             "wide": [(32, 64, 4, 2), (32, 32, 4, 1)]},
    "dq": {"narrow": [(128, 64, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2)],
           "wide": [(32, 64, 4, 2), (32, 32, 4, 1)]},
}


def _row_class(args) -> str:
    """'narrow' or 'wide': the bytes of one q/k row (split) plus one v row."""
    elements = 2 * args["BLOCK_HALF"] + args["BLOCK_PASS"] + args["BLOCK_DV"]
    return "narrow" if elements * args["p_q"].element_size() <= 512 else "wide"


def _autotuned(kernel, tiles):
    """The kernel autotuned over its tiles; launch-time pruning keeps those of the row class."""
    configs = {cls: [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in t]
               for cls, t in tiles.items()}

    def keep_row_class(all_configs, named_args, **kwargs):
        return configs[_row_class({**named_args, **kwargs})]

    return triton.autotune([c for cs in configs.values() for c in cs], key=_TUNE_KEY,
                           prune_configs_by={"early_config_prune": keep_row_class})(kernel)


_TUNE_KEY = ["ROTARY_DIM", "BLOCK_PASS", "BLOCK_DV", "CAUSAL", "ROTATE_K", "IS_VARLEN"]
_fwd_tuned = _autotuned(attention_fwd_kernel, _TILES["fwd"])
_dkdv_tuned = _autotuned(attention_bwd_dkdv_kernel, _TILES["dkdv"])
_dq_tuned = _autotuned(attention_bwd_dq_kernel, _TILES["dq"])
# The interpreter cannot time configs: it runs one fixed tile, small enough to exercise edges.
_INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}


def _launch(name, kernel, tuned, grid, args, meta):
    """Run a kernel: autotuned when compiled, fixed tiles under the interpreter."""
    meta = {**meta, "INT64": needs_int64(args)}
    with kernel_errors(name), torch.device(args[0].device):
        if triton_interpret():
            kernel[grid(_INTERPRET_BLOCKS)](*args, **meta, **_INTERPRET_BLOCKS, **LAUNCH_OPTIONS)
        else:
            tuned[grid](*args, **meta, **LAUNCH_OPTIONS)


def _kernel_meta(q, cfg, causal, rotate_q, rotate_k, plan):
    pass_dim = cfg.head_dim - cfg.rotary_dim
    return dict(ROTARY_DIM=cfg.rotary_dim, BLOCK_HALF=max(16, triton.next_power_of_2(cfg.rotary_dim // 2)),
                BLOCK_PASS=max(16, triton.next_power_of_2(pass_dim)) if pass_dim else 0,
                BLOCK_DV=max(16, triton.next_power_of_2(cfg.head_dim)), CAUSAL=causal,
                INTERLEAVED=cfg.interleaved, ROTATE_Q=rotate_q, ROTATE_K=rotate_k, IS_VARLEN=plan.varlen,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _shared_args(cfg, plan, q, k):
    """Pointers and scalars common to the forward and backward kernels (after the tensors)."""
    tables = rope_tables(cfg, q.device)
    cu_q = plan.cu_q if plan.varlen else plan.seq_sets
    cu_k = plan.cu_k if plan.varlen else plan.seq_sets
    return (plan.q_pos, plan.k_pos, tables, plan.seq_sets.to(torch.int32), cu_q, cu_k), (
        tables.shape[2], cfg.start_token, q.shape[2], k.shape[2], cfg.head_dim, q.shape[1] // k.shape[1])


def attention_forward(q, k, v, cfg, plan, causal, softmax_scale, rotate_q, rotate_k):
    """Triton forward: (out, lse) with out in q's layout and dtype, lse float32 (B, Hq, Sq), base 2."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    pointers, scalars = _shared_args(cfg, plan, q, k)
    args = (q, k, v, out, lse, *pointers, softmax_scale * 1.4426950408889634, *scalars,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
            *plan.q_pos.stride(), *plan.k_pos.stride())
    grid = lambda meta: (triton.cdiv(plan.max_q, meta["BLOCK_M"]), plan.n_seqs, q.shape[1])  # noqa: E731
    _launch("attention forward", attention_fwd_kernel, _fwd_tuned, grid, args,
            _kernel_meta(q, cfg, causal, rotate_q, rotate_k, plan))
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, cfg, plan, causal, softmax_scale, rotate_q, rotate_k):
    """Triton backward: (dq, dk, dv) in the inputs' layouts and dtypes."""
    batch, n_hq, sq, head_dim = q.shape
    delta = torch.empty((batch, n_hq, sq), dtype=torch.float32, device=q.device)
    block_dv = max(16, triton.next_power_of_2(head_dim))
    with kernel_errors("attention backward preprocess"), torch.device(q.device):
        attention_bwd_preprocess_kernel[(triton.cdiv(sq, 64), batch, n_hq)](
            out, grad_out, delta, sq, head_dim, *out.stride(), *grad_out.stride(), BLOCK_M=64, BLOCK_DV=block_dv,
            INT64=needs_int64((out, grad_out, delta)), **LAUNCH_OPTIONS)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    pointers, scalars = _shared_args(cfg, plan, q, k)
    meta = _kernel_meta(q, cfg, causal, rotate_q, rotate_k, plan)
    common_strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    tail = (*lse.stride(), *plan.q_pos.stride(), *plan.k_pos.stride())
    dkdv_args = (q, k, v, grad_out, lse, delta, dk, dv, *pointers, softmax_scale, *scalars, n_hq, sq,
                 *common_strides, *dk.stride(), *dv.stride(), *tail)
    _launch("attention backward dK/dV", attention_bwd_dkdv_kernel, _dkdv_tuned,
            lambda m: (triton.cdiv(plan.max_k, m["BLOCK_N"]), plan.n_seqs, k.shape[1]), dkdv_args, meta)
    dq_args = (q, k, v, grad_out, lse, delta, dq, *pointers, softmax_scale, *scalars, n_hq, sq,
               *common_strides, *dq.stride(), *tail)
    _launch("attention backward dQ", attention_bwd_dq_kernel, _dq_tuned,
            lambda m: (triton.cdiv(plan.max_q, m["BLOCK_M"]), plan.n_seqs, n_hq), dq_args, meta)
    return dq, dk, dv


# ---------------------------------------------------------------------------- custom op + autograd
@torch.library.custom_op("longrope_triton::fused_rope_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: Optional[torch.Tensor],
                  kv_position_ids: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                  cu_seqlens_k: Optional[torch.Tensor], causal: bool, softmax_scale: float,
                  seq_len: Optional[int], rotate_q: bool, rotate_k: bool, head_dim: int, rotary_dim: int,
                  base: float, original_max: int, max_pos: int, short_factor: list[float],
                  long_factor: list[float], start_token: int, mscale: float,
                  interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, lse). lse (base-2 log-sum-exp, float32) feeds the kernel backward; the
    PyTorch path recomputes in its backward and returns zeros there."""
    cfg = config_from_args(head_dim, rotary_dim, base, original_max, max_pos, short_factor, long_factor,
                           start_token, mscale, interleaved)
    plan = _Plan(cfg, q, k, position_ids, kv_position_ids, cu_seqlens_q, cu_seqlens_k, seq_len)
    if use_kernel(q):
        return attention_forward(q, k, v, cfg, plan, causal, softmax_scale, rotate_q, rotate_k)
    out = torch_attention(q, k, v, cfg, plan, causal, softmax_scale, rotate_q, rotate_k)
    return out, q.new_zeros(q.shape[:-1], dtype=torch.float32)


@_attention_op.register_fake
def _(q, k, v, *args):
    lse_shape = q.shape[:-1]
    return q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("longrope_triton::fused_rope_attention_backward", mutates_args=())
def _attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, position_ids: Optional[torch.Tensor],
                           kv_position_ids: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                           cu_seqlens_k: Optional[torch.Tensor], causal: bool, softmax_scale: float,
                           seq_len: Optional[int], rotate_q: bool, rotate_k: bool, head_dim: int,
                           rotary_dim: int, base: float, original_max: int, max_pos: int,
                           short_factor: list[float], long_factor: list[float], start_token: int,
                           mscale: float, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = config_from_args(head_dim, rotary_dim, base, original_max, max_pos, short_factor, long_factor,
                           start_token, mscale, interleaved)
    plan = _Plan(cfg, q, k, position_ids, kv_position_ids, cu_seqlens_q, cu_seqlens_k, seq_len)
    if use_kernel(q):
        return attention_backward(grad_out, q, k, v, out, lse, cfg, plan, causal, softmax_scale, rotate_q, rotate_k)
    return torch_attention_backward(grad_out, q, k, v, cfg, plan, causal, softmax_scale, rotate_q, rotate_k)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *rest[:4])
    ctx.rest = rest[4:]


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out.contiguous(), q, k, v, out, lse, *tensors, *ctx.rest)
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
    if k_is_rotated and return_rotated_k:
        raise ValueError("return_rotated_k needs raw keys, but k_is_rotated says k is already rotated")
    if return_rotated_k and cu_seqlens is not None:
        raise ValueError("return_rotated_k is not supported with packed sequences (cu_seqlens)")
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
    args = rope_args(cfg)
    if return_rotated_k:
        # Rotate K once (O(N d)); the attention then reads the rotated keys as a cache would.
        # The regime is fixed first from both position sets, as the attention would choose it.
        if seq_len is None:
            seq_len = _Plan(cfg, q, k, position_ids, kv_position_ids, None, None, None).max_position + 1
        _, k = _rotary_op(k[:, :0], k, kv_position_ids, seq_len, False, **args)
        k_is_rotated = True
    out, _ = _attention_op(q, k, v, position_ids, kv_position_ids, cu_seqlens_q, cu_seqlens_k, causal,
                           float(softmax_scale), seq_len, True, not k_is_rotated, **args)
    return (out, k) if return_rotated_k else out

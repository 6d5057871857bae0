"""fused_rope_attention: LongRoPE rotation inside FlashAttention-style attention.

Launchers, the custom op with autograd, the PyTorch path for CPU tensors, and the
public function. The Triton kernels are in kernels/attention_fwd.py and
kernels/attention_bwd.py; they share the rotation code of kernels/rotary.py.

Nothing after the public function's checks reads a tensor value on the host: the regime (table
set) of every batch row or packed sequence, the packed bounds and the key counts of a static
cache are device tensors, and every grid and loop bound comes from tensor shapes. A call
therefore compiles whole (torch.compile(fullgraph=True), torch.export) and can be captured in a
CUDA graph; the checks themselves follow _validation's modes (docs/compile.md).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton

from . import _dispatch
from ._dispatch import use_kernel
from ._validation import (check_config, check_cu_seqlens, check_cu_seqlens_values, check_default_positions,
                          check_gqa, check_heads, check_packed_lengths, check_position_values, check_positions,
                          check_same, check_seq_len, check_seqused_k, check_seqused_k_values, check_use_long)
from .config import LongRoPEConfig
from .decode import DECODE_MAX_QUERIES, decode_forward
from .rotary import (compute_dtype, config_from_args, launch_rotary, positions_end, regime_of, resolve_positions,
                     rope_args, torch_rotary)
from .kernels.attention_bwd import (attention_bwd_dkdv_kernel, attention_bwd_dq_kernel,
                                    attention_bwd_preprocess_kernel)
from .kernels.attention_fwd import attention_fwd_kernel

# Query rows per chunk of the PyTorch path: bounds its memory at ~chunk x Sk scores per head.
_TORCH_CHUNK = 1024


# ---------------------------------------------------------------------------- positions and regimes
def _sanitized_cu(cu: torch.Tensor, total: int) -> torch.Tensor:
    """cu_seqlens as int32 the kernels can trust whatever the caller passed: 0 first, ``total`` last,
    non-decreasing. A valid one comes back unchanged (eager checks reject an invalid one before;
    with them off or under tracing, this keeps every packed bound inside the tensors)."""
    inner = cu[1:-1].clamp(0, total)
    cu = torch.cat([cu.new_zeros(1), inner, cu.new_full((1,), total)])
    return torch.cummax(cu, 0).values.to(torch.int32)


def _segments(cu: torch.Tensor, rows: int) -> torch.Tensor:
    """The packed sequence of each of ``rows`` rows, int64 (rows,), from sanitized bounds."""
    return torch.searchsorted(cu[1:], torch.arange(rows, device=cu.device, dtype=cu.dtype), right=True)


def _segment_end(pos: torch.Tensor, seq: torch.Tensor, n: int) -> torch.Tensor:
    """max(position) + 1 per packed sequence, int64 (n,); 0 for an empty sequence."""
    return pos.new_zeros(n).scatter_reduce(0, seq, pos[0] + 1, reduce="amax")


def _max_end(a, b):
    """The larger of two lengths, each a host int or a device tensor (host only when both are)."""
    if not isinstance(a, torch.Tensor):
        a, b = b, a
    if not isinstance(a, torch.Tensor):
        return max(a, b)
    return torch.maximum(a, b) if isinstance(b, torch.Tensor) else a.clamp(min=b)


class _Plan:
    """Everything the kernels and the PyTorch path need besides q, k, v, as device tensors or host
    shapes (nothing is read back):

    - q_pos, k_pos: int64 positions (B or 1, S);
    - seq_sets: int32 table set (1 short, 2 long) of each batch row (B,) or packed sequence (n,),
      decided on the device (_validation and DESIGN §1: from max(position) + 1, seq_len, or the
      caller's use_long); q_sets, k_sets: the same per q / k row, broadcast views (B or 1, S);
    - varlen: packed sequences; cu_q, cu_k: int32 (n + 1,) bounds, always safe to index
      (_sanitized_cu); n_seqs = n (a host shape; empty sequences may appear anywhere); seq_q,
      seq_k: the packed sequence of each row;
    - seqused_k: int32 (B,) keys in use per batch row (a static KV cache; causal alignment is
      bottom-right against it), or None;
    - shared_positions: q and k rows are the same rows at the same positions (one rotary launch).

    The regime counts the key positions only when the keys are rotated here (``rotate_k``): a
    rotated cache was rotated in its own regime, and a static cache's unused slots have none.
    """

    def __init__(self, cfg, q, k, position_ids, kv_position_ids, cu_seqlens_q, cu_seqlens_k, seq_len,
                 use_long: Optional[torch.Tensor] = None, seqused_k: Optional[torch.Tensor] = None,
                 rotate_k: bool = True):
        self.varlen = cu_seqlens_q is not None
        self.seqused_k = None if seqused_k is None else seqused_k.clamp(0, k.shape[2]).to(torch.int32)
        if self.varlen:
            self._packed(cfg, q, k, position_ids, kv_position_ids, cu_seqlens_q, cu_seqlens_k, seq_len, use_long,
                         rotate_k)
        else:
            self._batched(cfg, q, k, position_ids, kv_position_ids, seq_len, use_long, rotate_k)

    def _batched(self, cfg, q, k, position_ids, kv_position_ids, seq_len, use_long, rotate_k):
        batch, sq, sk, device = q.shape[0], q.shape[2], k.shape[2], q.device
        used = self.seqused_k
        # Default query positions end where the keys in use end (bottom-right alignment).
        q_start = sk - sq if used is None else used.to(torch.int64)[:, None] - sq
        self.q_pos = resolve_positions(position_ids, batch, sq, device, start=q_start)
        self.k_pos = resolve_positions(kv_position_ids, batch, sk, device)
        end = sk if position_ids is None and used is None else positions_end(self.q_pos)
        if rotate_k:
            if kv_position_ids is not None:
                k_pos = self.k_pos if used is None else torch.where(
                    torch.arange(sk, device=device) < used[:, None], self.k_pos, -1)
                end = _max_end(end, positions_end(k_pos))
            else:
                end = _max_end(end, sk if used is None else used.amax().to(torch.int64))
        self.seq_sets = regime_of(cfg, end, seq_len, use_long, device).expand(batch)
        self.q_sets = self.seq_sets[:, None].expand(batch, sq)
        self.k_sets = self.seq_sets[:, None].expand(batch, sk)
        self.cu_q = self.cu_k = self.seq_q = self.seq_k = None
        self.n_seqs = batch
        self.shared_positions = sq == sk and position_ids is kv_position_ids and used is None

    def _packed(self, cfg, q, k, position_ids, kv_position_ids, cu_seqlens_q, cu_seqlens_k, seq_len, use_long,
                rotate_k):
        sq, sk, device = q.shape[2], k.shape[2], q.device
        n = cu_seqlens_q.shape[0] - 1
        self.cu_q = _sanitized_cu(cu_seqlens_q, sq)
        same = cu_seqlens_k is None or (cu_seqlens_k is cu_seqlens_q and sq == sk)
        self.cu_k = self.cu_q if same else _sanitized_cu(cu_seqlens_k, sk)
        self.seq_q = _segments(self.cu_q, sq)
        self.seq_k = self.seq_q if same else _segments(self.cu_k, sk)
        lens_q, lens_k = self.cu_q[1:] - self.cu_q[:-1], self.cu_k[1:] - self.cu_k[:-1]
        if position_ids is None:  # per-sequence arange, bottom-right aligned to the sequence's keys
            rows = torch.arange(sq, device=device)
            self.q_pos = (rows - self.cu_q[self.seq_q] + (lens_k - lens_q)[self.seq_q]).to(torch.int64)[None]
        else:
            self.q_pos = position_ids.expand(1, sq).to(torch.int64)
        if kv_position_ids is None:
            self.k_pos = (torch.arange(sk, device=device) - self.cu_k[self.seq_k]).to(torch.int64)[None]
        else:
            self.k_pos = kv_position_ids.expand(1, sk).to(torch.int64)
        ends = None
        if use_long is None and seq_len is None:
            ends = _segment_end(self.q_pos, self.seq_q, n)
            if rotate_k:
                ends = torch.maximum(ends, _segment_end(self.k_pos, self.seq_k, n))
        self.seq_sets = regime_of(cfg, ends, seq_len, use_long, device).expand(n)
        self.q_sets = self.seq_sets[self.seq_q][None]
        self.k_sets = self.seq_sets[self.seq_k][None]
        self.n_seqs = n
        self.shared_positions = same and position_ids is kv_position_ids


# ---------------------------------------------------------------------------- row ranges
# Which keys each query row sees and which query rows see each key: what the kernels loop over and
# what the PyTorch path masks with.
def _query_ranges(plan, causal, sq, sk, device):
    """(lo, hi), int32 (B or 1, Sq): the keys [lo, hi) each query row sees: its packed sequence's keys
    (all keys when not packed, the first seqused_k[b] of batch row b of a static cache), under causal
    only the first (Sk_b - Sq_b) + i + 1 of them for its query i (bottom-right aligned). One row that
    every batch row shares, or one per batch row with seqused_k. Non-decreasing along the rows, which
    the kernels rely on. Device ops on the plan's bounds, never a host read: grids and sizes come from
    tensor shapes only."""
    rows = torch.arange(sq, device=device)[None]
    if plan.varlen:
        lo, hi, end = plan.cu_k[plan.seq_q][None], plan.cu_k[plan.seq_q + 1][None], plan.cu_q[plan.seq_q + 1][None]
    else:
        used = plan.seqused_k
        lo, end = torch.zeros_like(rows), sq
        hi = torch.full_like(rows, sk) if used is None else used[:, None].expand(-1, sq)
    if causal:
        hi = torch.maximum(hi + (rows + 1 - end), lo)
    return _range_pair(lo, hi)


def _key_ranges(plan, causal, sq, sk, device):
    """(lo, hi), int32 (B or 1, Sk): the query rows [lo, hi) that see each key (the transpose of
    _query_ranges; a static cache's keys past seqused_k[b] are seen by none: lo = hi),
    non-decreasing along the keys."""
    keys = torch.arange(sk, device=device)[None]
    if plan.varlen:
        lo, hi, end = plan.cu_q[plan.seq_k][None], plan.cu_q[plan.seq_k + 1][None], plan.cu_k[plan.seq_k + 1][None]
    else:
        used = plan.seqused_k
        lo, hi = torch.zeros_like(keys), torch.full_like(keys, sq)
        end = sk if used is None else used[:, None].to(keys.dtype)
        if used is not None and not causal:  # (causal: the clamp below empties them)
            lo = torch.where(keys < end, lo, hi)
    if causal:
        lo = torch.minimum(torch.maximum(hi + (keys - end), lo), hi)
    return _range_pair(lo, hi)


def _range_pair(lo, hi):
    """lo and hi as contiguous int32 arrays of one shape, (1, S) or (B, S)."""
    lo, hi = torch.broadcast_tensors(lo, hi)
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


# ---------------------------------------------------------------------------- PyTorch path
def _torch_sdpa(q, k, v, plan: _Plan, causal: bool, scale: float) -> torch.Tensor:
    """softmax attention with GQA, bottom-right causal, chunked over queries (memory ~chunk x Sk).
    Packed sequences and a static cache's key counts are masks built on the device."""
    sq, sk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if plan.varlen or plan.seqused_k is not None:
        lo, hi = _query_ranges(plan, causal, sq, sk, q.device)
        # Causal self-attention over one index axis (packed sequences sharing their bounds): a row
        # never sees a key past itself, so a chunk's keys end where the chunk does.
        aligned = causal and plan.varlen and plan.cu_k is plan.cu_q
        keys = torch.arange(sk, device=q.device)
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        for a in range(0, sq, _TORCH_CHUNK):
            b = min(a + _TORCH_CHUNK, sq)
            end = b if aligned else sk
            seen = (keys[:end] >= lo[:, a:b, None]) & (keys[:end] < hi[:, a:b, None])
            chunk = F.scaled_dot_product_attention(q[..., a:b, :], k[..., :end, :], v[..., :end, :],
                                                   attn_mask=seen[:, None], scale=scale, enable_gqa=gqa)
            # A row that sees no key gives zeros, as flash-attn does (the softmax of nothing is NaN).
            out[..., a:b, :] = torch.where((hi[:, a:b] > lo[:, a:b])[:, None, :, None], chunk, 0.0)
        return out
    if not causal or sq == sk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    offset = sk - sq
    first_row = max(0, -offset)  # rows before it see no key: zeros, as flash-attn
    keys = torch.arange(sk, device=q.device)
    for a in range(first_row, sq, _TORCH_CHUNK):
        b = min(a + _TORCH_CHUNK, sq)
        end = b + offset
        mask = keys[None, :end] <= torch.arange(a + offset, b + offset, device=q.device)[:, None]
        out[..., a:b, :] = F.scaled_dot_product_attention(
            q[..., a:b, :], k[..., :end, :], v[..., :end, :], attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out


def torch_attention(q, k, v, cfg: LongRoPEConfig, plan: _Plan, causal: bool, scale: float,
                    rotate_q: bool, rotate_k: bool):
    """PyTorch path with the kernels' convention: q and k rotated once (float64 angles) and rounded
    to the input dtype, then attention in compute_dtype. Returns (out, q_rot, k_rot) in the
    layouts the kernels give (those of q and k). Vectorized: no host read."""
    dtype = compute_dtype(q.dtype)
    q_rot = torch.empty_like(q).copy_(torch_rotary(q, plan.q_pos, plan.q_sets, cfg)) if rotate_q else q
    k_rot = torch.empty_like(k).copy_(torch_rotary(k, plan.k_pos, plan.k_sets, cfg)) if rotate_k else k
    out = _torch_sdpa(q_rot.to(dtype), k_rot.to(dtype), v.to(dtype), plan, causal, scale)
    return torch.empty_like(q).copy_(out), q_rot, k_rot


def torch_attention_backward(grad_out, q_rot, k_rot, v, grad_k_rot, cfg: LongRoPEConfig, plan: _Plan,
                             causal: bool, scale: float, rotate_q: bool, rotate_k: bool):
    """PyTorch-path gradients (the FlashAttention-2 formulas, chunked over query rows) on the rotated
    operands: dV = P^T dO, dS = P (dO V^T - rowsum(dO O)), dQ = scale dS K, dK = scale dS^T Q in the
    rotated space (plus grad_k_rot, the gradient reaching returned rotated keys, or None), then the
    conjugate rotation back; GQA gradients summed over each group. Masks as in the forward."""
    dtype = compute_dtype(q_rot.dtype)
    batch, n_hq, sq, _ = q_rot.shape
    sk = k_rot.shape[2]
    group = n_hq // k_rot.shape[1]
    qd, do = q_rot.to(dtype), grad_out.to(dtype)
    kd, vd = (t.to(dtype).repeat_interleave(group, 1) for t in (k_rot, v))
    dq_rot = torch.zeros(q_rot.shape, dtype=dtype, device=q_rot.device)
    dk_rot, dv_rot = torch.zeros_like(kd), torch.zeros_like(vd)
    masked = plan.varlen or plan.seqused_k is not None
    if masked:
        lo, hi = _query_ranges(plan, causal, sq, sk, q_rot.device)
    aligned = causal and (plan.cu_k is plan.cu_q if plan.varlen else (not masked and sq == sk))
    keys = torch.arange(sk, device=q_rot.device)
    rows = max(16, (1 << 24) // max(1, sk * n_hq * batch))
    for a in range(0, sq, rows):
        e = min(a + rows, sq)
        end = e if aligned else sk
        s = torch.matmul(qd[:, :, a:e], kd[:, :, :end].transpose(-1, -2)) * scale
        if masked:
            s = s.masked_fill(~((keys[:end] >= lo[:, a:e, None]) & (keys[:end] < hi[:, a:e, None]))[:, None],
                              float("-inf"))
        elif causal:
            diagonal = torch.arange(a, e, device=q_rot.device)[:, None] + (sk - sq)
            s = s.masked_fill(keys[None, :end] > diagonal, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
        do_c, k_c, v_c = do[:, :, a:e], kd[:, :, :end], vd[:, :, :end]
        delta = (do_c * torch.matmul(p, v_c)).sum(-1, keepdim=True)
        dv_rot[:, :, :end] += torch.matmul(p.transpose(-1, -2), do_c)
        ds = p * (torch.matmul(do_c, v_c.transpose(-1, -2)) - delta)
        dq_rot[:, :, a:e] = torch.matmul(ds, k_c) * scale
        dk_rot[:, :, :end] += torch.matmul(ds.transpose(-1, -2), qd[:, :, a:e]) * scale
    fold = lambda t: t.unflatten(1, (-1, group)).sum(2)  # noqa: E731 - sum each GQA group
    dk_rot = fold(dk_rot)
    if grad_k_rot is not None:
        dk_rot += grad_k_rot
    dq = torch_rotary(dq_rot, plan.q_pos, plan.q_sets, cfg, conjugate=True) if rotate_q else dq_rot
    dk = torch_rotary(dk_rot, plan.k_pos, plan.k_sets, cfg, conjugate=True) if rotate_k else dk_rot
    return (torch.empty_like(q_rot).copy_(dq), torch.empty_like(k_rot).copy_(dk),
            torch.empty_like(v).copy_(fold(dv_rot)))


# ---------------------------------------------------------------------------- Triton launchers
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and row class (the bytes of one q, k or v
# row: BLOCK_D x element size); the first of each list is what LONGROPE_TRITON_PIN_TILES=1 runs.
# For fp16/bf16 every tile compiles for sm_90 on both load paths within an H100 block's shared
# memory; up to head_dim 128 they run wgmma only, spill at most 256 B/thread and never inside a
# loop, and keep their steady-state loop within the instruction budget; head_dim 256's are
# spill-free (its dK/dV on mma.sync). tests/test_compile_budget.py holds them to it
# (scripts/sass_report.py, docs/kernels.md).
_TILES = {
    "fwd": {128: [(128, 128, 8, 3), (128, 64, 8, 3)],
            256: [(128, 128, 8, 2), (128, 64, 8, 2)],
            512: [(64, 32, 4, 1)],
            1024: [(16, 32, 4, 2)]},
    "dkdv": {128: [(64, 128, 8, 2), (64, 128, 8, 3)],
             256: [(64, 128, 8, 2), (64, 64, 4, 2)],
             512: [(32, 32, 8, 2), (16, 32, 8, 1)],
             1024: [(16, 16, 4, 2)]},
    "dq": {128: [(128, 128, 8, 2), (128, 64, 8, 3)],
           256: [(128, 128, 8, 2), (128, 64, 8, 3)],
           512: [(64, 32, 4, 2)],
           1024: [(16, 32, 4, 2)]},
}
# Where the pointer load path (no TMA) takes its own list. dK/dV at head_dim 80-128: M64 N64 w4
# computes each Q and dO tile's addresses over half the threads (8 loads each, twice the address
# registers of w8) and reloads values from local memory in its loops, so pointers keep one tile.
_POINTER_TILES = {"dkdv": {256: [(64, 128, 8, 2)]}, "dq": {}}
# Row classes whose loops never load through TMA, per kernel.
_NO_TMA = {"dkdv": set()}

# The lists above are chosen and budgeted on the Triton of the test extra (3.9). Earlier releases
# (3.6, the floor and the GPU machine's; 3.7 and 3.8 are assumed to behave like it) compile two of
# them into local memory in the sm_90 compile, so there the launcher takes what compiles clean
# with 3.6 (CI holds those to the same resource rules with the oldest Triton; docs/kernels.md):
# - dK/dV at head_dim 80-128 on TMA reloads values from local memory inside its loop (M64 N128 w8:
#   11 local loads/stores; the TMA tiles that compile clean, M32 N128 and M64 N64 w8, issue 1.4-1.6x
#   the instructions of the pointer tile, which compiles clean): that row class loads through pointers;
# - dQ at head_dim 256 on pointers (M64 N32 w4) spills 120 B/thread; M64 N64 w8 spills none.
if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 9):
    _POINTER_TILES["dq"] = {512: [(64, 64, 8, 2)]}
    _NO_TMA["dkdv"] = {256}


def row_class(block_d: int, element_size: int) -> int:
    """The tile class of a launch: bytes of one row, rounded up to a class of _TILES."""
    return max(128, min(1024, block_d * element_size))


def _autotuned(kernel, tiles, descriptors, pointer_tiles=None):
    """The kernel autotuned over its tiles; launch-time pruning keeps those of the row class and load
    path (``pointer_tiles``: the row classes whose pointer-path list differs). Before each config
    runs, its pre_hook sets the block shape of the TensorDescriptor arguments: ``descriptors`` maps
    each such argument to the meta-parameter that counts its rows."""
    def block_shapes(nargs):
        for name, rows in descriptors.items():
            if _dispatch.is_descriptor(nargs[name]):
                nargs[name].block_shape = [1, 1, nargs[rows], nargs["BLOCK_D"]]

    def configs(lists):
        return {cls: [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=block_shapes)
                      for m, n, w, s in t] for cls, t in lists.items()}

    shared, pointers = configs(tiles), configs(pointer_tiles or {})
    by_path = {True: shared, False: {**shared, **pointers}}  # keyed by USE_TMA
    operand = "p_k" if "p_q" in descriptors else "p_q"  # an input that stays a pointer: it has the dtype

    def keep_row_class(all_configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        tiles = by_path[bool(args["USE_TMA"])][row_class(args["BLOCK_D"], args[operand].element_size())]
        return tiles[:1] if _dispatch.pinned_tiles() else tiles

    # Keys are constexpr dims and flags only (sequence lengths are not specialized either, and the
    # causal mask and packing are data: row ranges), so a new length or mask never retunes or
    # recompiles; the dtype is part of Triton's own key (from the inputs that stay pointers).
    return triton.autotune([c for cs in (*shared.values(), *pointers.values()) for c in cs], key=["BLOCK_D", "USE_TMA"],
                           prune_configs_by={"early_config_prune": keep_row_class})(kernel)


_fwd_tuned = _autotuned(attention_fwd_kernel, _TILES["fwd"], {"p_k": "BLOCK_N", "p_v": "BLOCK_N"})
_dkdv_tuned = _autotuned(attention_bwd_dkdv_kernel, _TILES["dkdv"], {"p_q": "BLOCK_M", "p_do": "BLOCK_M"},
                         _POINTER_TILES["dkdv"])
_dq_tuned = _autotuned(attention_bwd_dq_kernel, _TILES["dq"], {"p_k": "BLOCK_N", "p_v": "BLOCK_N"},
                       _POINTER_TILES["dq"])
# The interpreter cannot time configs: it runs one fixed tile, small enough to exercise edges.
_INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}


def _launch(name, kernel, tuned, grid, args, meta):
    _dispatch.launch(name, kernel, grid, args, meta, tuned=tuned, interpret_meta=_INTERPRET_BLOCKS)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _common_meta(q, use_tma):
    return dict(BLOCK_D=_block_d(q.shape[-1]), DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                USE_TMA=use_tma)


def _range_args(lo, hi):
    """The kernels' (p_lo, p_hi) and batch stride of ranges from _query_ranges / _key_ranges: 0 when
    every batch row shares one row of ranges."""
    return lo, hi, lo.stride(0) if lo.shape[0] > 1 else 0


def _loop_operands(*tensors, kernel=None):
    """(operands, use_tma): what the kernel's loops load from. TensorDescriptors (TMA) when the device
    has TMA, every tensor's layout allows it (_dispatch.descriptor) and the kernel's row class loads
    through TMA (_NO_TMA), else the tensors themselves."""
    first = tensors[0]
    if row_class(_block_d(first.shape[-1]), first.element_size()) not in _NO_TMA.get(kernel, ()):
        descs = [_dispatch.descriptor(t) for t in tensors]
        if all(d is not None for d in descs):
            return descs, True
    return list(tensors), False


def _scales(softmax_scale, k_rot):
    """(keys, qk_scale): the kernels take the row max before scaling, which needs a scale >= 0. A
    negative one is the positive scale on -k (a sign flip: exact, the same rounding), as the
    backward's gradient multipliers account for."""
    if softmax_scale < 0:
        k_rot = -k_rot
    return k_rot, abs(softmax_scale) * 1.4426950408889634


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
        out, lse = decode_forward(q_rot, k_rot, v, causal, softmax_scale, seqused_k=plan.seqused_k)
    else:
        out, lse = _prefill_forward(q_rot, k_rot, v, plan, causal, softmax_scale)
    return out, lse, q_rot if rotate_q else q.new_empty(0), k_rot if rotate_k else q.new_empty(0)


def _prefill_forward(q_rot, k_rot, v, plan, causal, softmax_scale):
    """The FlashAttention-2 forward kernel on rotated q and k: (out, lse)."""
    out = torch.empty_like(q_rot)
    lse = torch.empty(q_rot.shape[:-1], dtype=torch.float32, device=q_rot.device)
    keys, qk_scale = _scales(softmax_scale, k_rot)
    (k_in, v_in), use_tma = _loop_operands(keys, v)
    sq, sk = q_rot.shape[2], k_rot.shape[2]
    p_lo, p_hi, stride_rb = _range_args(*_query_ranges(plan, causal, sq, sk, q_rot.device))
    args = (q_rot, k_in, v_in, out, lse, p_lo, p_hi, qk_scale, sq, sk, q_rot.shape[3], q_rot.shape[1] // k_rot.shape[1],
            *q_rot.stride(), *keys.stride(), *v.stride(), *out.stride(), *lse.stride(), stride_rb)
    grid = lambda m: (triton.cdiv(sq, m["BLOCK_M"]), q_rot.shape[0], q_rot.shape[1])  # noqa: E731
    _launch("attention forward", attention_fwd_kernel, _fwd_tuned, grid, args, _common_meta(q_rot, use_tma))
    return out, lse


def _gradient_buffer(x):
    """(grad, acc): the dq / dk kernels always write an fp32 buffer (grad itself for fp32), which the
    conjugate rotation, or a copy where nothing is rotated (keys from a KV cache), rounds once into
    grad. One output type, so rotated or not the dK/dV and dQ kernels compile the same way (the
    variants tests/test_compile_budget.py budgets)."""
    grad = torch.empty_like(x)
    return grad, (grad if x.dtype == torch.float32 else torch.empty(x.shape, dtype=torch.float32, device=x.device))


def attention_backward(grad_out, q_rot, k_rot, v, out, lse, grad_k_rot, cfg, plan, causal, softmax_scale,
                       rotate_q, rotate_k):
    """Triton backward on the rotated operands: (dq, dk, dv) in the inputs' layouts and dtypes.
    grad_k_rot: the gradient reaching the rotated keys the forward returned (or None)."""
    batch, n_hq, sq, head_dim = q_rot.shape
    sk = k_rot.shape[2]
    # Each row's (lse, delta = rowsum(dO O)) pair, interleaved: the dK/dV loop loads both at once.
    # 4,096 elements of O and of dO a program (32 a thread): 64 a thread spill 8 B in Triton 3.6's compile.
    ld = torch.empty((batch, n_hq, sq, 2), dtype=torch.float32, device=q_rot.device)
    block_m = min(64, 4096 // _block_d(head_dim))
    _dispatch.launch("attention backward preprocess", attention_bwd_preprocess_kernel,
                     (triton.cdiv(sq, block_m), batch, n_hq), (out, grad_out, lse, ld, sq, head_dim, *out.stride(),
                                                               *grad_out.stride(), *lse.stride()),
                     dict(BLOCK_M=block_m, BLOCK_DV=_block_d(head_dim)))
    dq, dq_acc = _gradient_buffer(q_rot)
    dk, dk_acc = _gradient_buffer(k_rot)
    dv = torch.empty_like(v)
    keys, qk_scale = _scales(softmax_scale, k_rot)
    head = (sq, sk, head_dim, n_hq // k_rot.shape[1], n_hq)
    strides = (*q_rot.stride(), *keys.stride(), *v.stride(), *grad_out.stride())
    # dk is the gradient of the keys the kernel read (-k for a negative scale): the signed scale
    # restores it; dq's multiplier is |scale| either way (see _scales).
    (q_in, do_in), use_tma = _loop_operands(q_rot, grad_out, kernel="dkdv")
    p_lo, p_hi, stride_rb = _range_args(*_key_ranges(plan, causal, sq, sk, q_rot.device))
    _launch("attention backward dK/dV", attention_bwd_dkdv_kernel, _dkdv_tuned,
            lambda m: (triton.cdiv(sk, m["BLOCK_N"]), batch, k_rot.shape[1]),
            (q_in, keys, v, do_in, ld, dk_acc, dv, p_lo, p_hi, qk_scale, softmax_scale, *head, *strides,
             *dk_acc.stride(), *dv.stride(), stride_rb), _common_meta(q_rot, use_tma))
    (k_in, v_in), use_tma = _loop_operands(keys, v)
    p_lo, p_hi, stride_rb = _range_args(*_query_ranges(plan, causal, sq, sk, q_rot.device))
    _launch("attention backward dQ", attention_bwd_dq_kernel, _dq_tuned,
            lambda m: (triton.cdiv(sq, m["BLOCK_M"]), batch, n_hq),
            (q_rot, k_in, v_in, grad_out, ld, dq_acc, p_lo, p_hi, qk_scale, abs(softmax_scale), *head, *strides,
             *dq_acc.stride(), stride_rb), _common_meta(q_rot, use_tma))
    if grad_k_rot is not None:
        dk_acc += grad_k_rot
    # Back to the caller's space: the conjugate rotation, once per token.
    rotate_once(dq_acc, dk_acc, cfg, plan, rotate_q, rotate_k, conjugate=True, q_out=dq, k_out=dk)
    for grad, acc, rotated in ((dq, dq_acc, rotate_q), (dk, dk_acc, rotate_k)):
        if not rotated and grad is not acc:
            grad.copy_(acc)
    return dq, dk, dv


# ---------------------------------------------------------------------------- custom op + autograd
def attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: Optional[torch.Tensor],
                   kv_position_ids: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                   cu_seqlens_k: Optional[torch.Tensor], causal: bool, softmax_scale: float,
                   seq_len: Optional[int], rotate_q: bool, rotate_k: bool, head_dim: int,
                   rotary_dim: int, base: float, original_max: int, max_pos: int, short_factor: list[float],
                   long_factor: list[float], start_token: int, short_mscale: float, long_mscale: float,
                   interleaved: bool, use_long: Optional[torch.Tensor] = None,
                   seqused_k: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward custom op's implementation. Returns (out, lse, q_rot, k_rot): out in q's layout;
    lse (base-2 log-sum-exp, float32, (B, Hq, Sq)) feeds the kernel backward (the PyTorch path
    recomputes and returns zeros); q_rot / k_rot the rotated q / k in their layouts, or empty
    tensors when not rotated. Reads no tensor value on the host."""
    cfg = config_from_args(head_dim, rotary_dim, base, original_max, max_pos, short_factor, long_factor,
                           start_token, short_mscale, long_mscale, interleaved)
    plan = _Plan(cfg, q, k, position_ids, kv_position_ids, cu_seqlens_q, cu_seqlens_k, seq_len, use_long,
                 seqused_k, rotate_k)
    if use_kernel(q):
        return attention_forward(q, k, v, cfg, plan, causal, softmax_scale, rotate_q, rotate_k)
    out, q_rot, k_rot = torch_attention(q, k, v, cfg, plan, causal, softmax_scale, rotate_q, rotate_k)
    return (out, q.new_zeros(q.shape[:-1], dtype=torch.float32), q_rot if rotate_q else q.new_empty(0),
            k_rot if rotate_k else q.new_empty(0))


_attention_op = torch.library.custom_op("longrope_triton::fused_rope_attention", attention_impl, mutates_args=())


@_attention_op.register_fake
def _(q, k, v, position_ids, kv_position_ids, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, seq_len,
      rotate_q, rotate_k, *rope, **optional):
    # Layouts as the implementations give them (out and the rotated tensors like q and k): a
    # compiled graph (inductor) relies on them.
    return (torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32),
            torch.empty_like(q) if rotate_q else q.new_empty(0),
            torch.empty_like(k) if rotate_k else q.new_empty(0))


def attention_backward_impl(grad_out: torch.Tensor, q_rot: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, grad_k_rot: Optional[torch.Tensor],
                            position_ids: Optional[torch.Tensor], kv_position_ids: Optional[torch.Tensor],
                            cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                            causal: bool, softmax_scale: float, seq_len: Optional[int], rotate_q: bool,
                            rotate_k: bool, head_dim: int, rotary_dim: int, base: float,
                            original_max: int, max_pos: int, short_factor: list[float], long_factor: list[float],
                            start_token: int, short_mscale: float, long_mscale: float,
                            interleaved: bool, use_long: Optional[torch.Tensor] = None,
                            seqused_k: Optional[torch.Tensor] = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward custom op's implementation: (dq, dk, dv) in the layouts of q, k, v."""
    cfg = config_from_args(head_dim, rotary_dim, base, original_max, max_pos, short_factor, long_factor,
                           start_token, short_mscale, long_mscale, interleaved)
    plan = _Plan(cfg, q_rot, k_rot, position_ids, kv_position_ids, cu_seqlens_q, cu_seqlens_k, seq_len, use_long,
                 seqused_k, rotate_k)
    if use_kernel(q_rot):
        return attention_backward(grad_out, q_rot, k_rot, v, out, lse, grad_k_rot, cfg, plan, causal, softmax_scale,
                                  rotate_q, rotate_k)
    return torch_attention_backward(grad_out, q_rot, k_rot, v, grad_k_rot, cfg, plan, causal, softmax_scale,
                                    rotate_q, rotate_k)


_attention_backward_op = torch.library.custom_op("longrope_triton::fused_rope_attention_backward",
                                                 attention_backward_impl, mutates_args=())


@_attention_backward_op.register_fake
def _(grad_out, q_rot, k_rot, v, *args, **kwargs):
    return torch.empty_like(q_rot), torch.empty_like(k_rot), torch.empty_like(v)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, position_ids, kv_position_ids, cu_q, cu_k = inputs[:7]
    ctx.rest, (use_long, seqused_k) = inputs[7:-2], inputs[-2:]  # rest: causal, softmax_scale, seq_len, ...
    rotate_q, rotate_k = ctx.rest[3], ctx.rest[4]
    out, lse, q_rot, k_rot = output
    # The backward runs on the rotated operands: saving them costs what saving q and k would.
    ctx.save_for_backward(q_rot if rotate_q else q, k_rot if rotate_k else k, v, out, lse, position_ids,
                          kv_position_ids, cu_q, cu_k, use_long, seqused_k)


def _attention_backward(ctx, grad_out, grad_lse, grad_q_rot, grad_k_rot):
    q_rot, k_rot, v, out, lse, *tensors, use_long, seqused_k = ctx.saved_tensors
    rotate_k = ctx.rest[4]
    grad_k_rot = grad_k_rot if rotate_k and grad_k_rot is not None and grad_k_rot.numel() else None
    dq, dk, dv = _attention_backward_op(grad_out.contiguous(), q_rot, k_rot, v, out, lse, grad_k_rot, *tensors,
                                        *ctx.rest, use_long=use_long, seqused_k=seqused_k)
    return (dq, dk, dv) + (None,) * (4 + len(ctx.rest) + 2)


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


# ---------------------------------------------------------------------------- public functions
def fused_rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LongRoPEConfig,
                         position_ids: Optional[torch.Tensor] = None,
                         kv_position_ids: Optional[torch.Tensor] = None, causal: bool = True,
                         softmax_scale: Optional[float] = None, seq_len: Optional[int] = None, *,
                         cu_seqlens: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
                         use_long: Optional[torch.Tensor] = None, seqused_k: Optional[torch.Tensor] = None,
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
        seq_len: the length that picks short vs long factors; default max(position ids) + 1 over the
            batch (the positions of the tensors rotated here), computed on the device.
        cu_seqlens: packed sequences (flash-attn convention): batch must be 1 and ``cu_seqlens``
            (n_seqs + 1,) int32/int64 the sequence starts (empty sequences allowed anywhere); positions
            restart per sequence and each sequence picks its own regime from its own length.
            ``cu_seqlens_k`` overrides it for k/v.
        use_long: bool (batch,) -- (n_seqs,) with cu_seqlens -- True where a sequence runs the long
            factors: the caller's regime (a serving engine decides it from a request's whole prompt,
            not from one chunk's positions), instead of seq_len and the positions.
        seqused_k: int (batch,): only the first seqused_k[b] keys of row b are attended, and causal
            alignment is bottom-right against them (a static KV cache whose filled length lives on the
            device: no host sync, CUDA-graph friendly). Not with cu_seqlens.
        k_is_rotated: k is already rotated (a KV cache); only q is rotated, and only q's positions
            pick the regime (the cache's keys were rotated in theirs).
        return_rotated_k: also return the rotated keys (to store in a cache).

    Returns:
        out (batch, q_heads, Sq, head_dim) in q's dtype; ``(out, k_rot)`` with return_rotated_k.
        Differentiable in q, k and v. Nothing after the input checks reads a tensor value on the
        host: under torch.compile / torch.export / CUDA-graph capture the value checks are device
        asserts, and ``LONGROPE_TRITON_EAGER_CHECKS=0`` skips them in eager mode (docs/compile.md).

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
    batch, sq, sk = q.shape[0], q.shape[2], k.shape[2]
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must share batch, heads and seq, got {tuple(k.shape)} and {tuple(v.shape)}")
    if batch != k.shape[0]:
        raise ValueError(f"q and k must share the batch size, got {batch} and {k.shape[0]}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(cfg.head_dim)
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not (torch.compiler.is_compiling() or math.isfinite(softmax_scale)):  # traced: maybe a symbolic float
        raise TypeError(f"softmax_scale must be a finite float, got {softmax_scale!r}")
    if k_is_rotated and sk < sq:
        raise ValueError(f"k_is_rotated: the KV cache holds {sk} keys, fewer than the {sq} queries "
                         f"(a cache includes the step's own tokens)")
    if k_is_rotated and return_rotated_k:
        raise ValueError("return_rotated_k needs raw keys, but k_is_rotated says k is already rotated")
    cu_q = check_cu_seqlens("cu_seqlens", cu_seqlens, q.device)
    cu_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device) if cu_seqlens_k is not None else cu_q
    if cu_q is None and cu_k is not None:
        raise ValueError("cu_seqlens_k needs cu_seqlens for the queries")
    if cu_q is not None:
        if batch != 1:
            raise ValueError(f"packed sequences (cu_seqlens) need batch 1, got {batch}")
        if cu_q.shape[0] != cu_k.shape[0]:
            raise ValueError("cu_seqlens and cu_seqlens_k must describe the same number of sequences")
        if seqused_k is not None:
            raise ValueError("seqused_k is for batched rows; packed sequences give their key counts in cu_seqlens_k")
    position_ids = check_positions("position_ids", position_ids, batch, sq, q.device)
    kv_position_ids = check_positions("kv_position_ids", kv_position_ids, batch, sk, q.device)
    seq_len = check_seq_len(seq_len)
    n = batch if cu_q is None else cu_q.shape[0] - 1
    use_long = check_use_long(use_long, ((n,),), "one per packed sequence" if cu_q is not None
                              else "one per batch row", q.device)
    seqused_k = check_seqused_k(seqused_k, batch, q.device)
    # Values: each checked once, here (device asserts under tracing; nothing with eager checks off).
    if cu_q is not None:
        check_cu_seqlens_values("cu_seqlens", cu_q, sq)
        if cu_k is not cu_q or sk != sq:
            check_cu_seqlens_values("cu_seqlens_k", cu_k, sk)
            check_packed_lengths(cu_q, cu_k)
    if seqused_k is not None:
        check_seqused_k_values(seqused_k, sq if k_is_rotated else 0, sk,
                               "a cache includes the step's own tokens" if k_is_rotated else "keys in use")
    for name, pos, rotated in (("position_ids", position_ids, True), ("kv_position_ids", kv_position_ids,
                                                                        not k_is_rotated)):
        if pos is not None and rotated:
            check_position_values(name, pos, cfg.max_position_embeddings)
    if cu_q is None and (position_ids is None or (kv_position_ids is None and not k_is_rotated)):
        check_default_positions(sk, cfg.max_position_embeddings)
    elif cu_q is not None and (position_ids is None or kv_position_ids is None):
        # per-sequence arange: a sequence's keys end at its last position + 1
        check_position_values("packed sequence positions", (cu_k[1:] - cu_k[:-1]).clamp(min=1) - 1,
                              cfg.max_position_embeddings)
    out, _, _, k_rot = _attention_op(q, k, v, position_ids, kv_position_ids, cu_q, cu_k, causal,
                                     float(softmax_scale), seq_len, True, not k_is_rotated, **rope_args(cfg),
                                     use_long=use_long, seqused_k=seqused_k)
    return (out, k_rot) if return_rotated_k else out

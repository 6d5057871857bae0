"""Fused LongRoPE attention, backward: the FlashAttention-2 dK/dV loop and dQ loop.

Both loops run on the rotated operands the forward produced (q_rot written by the forward's
prologue, k_rot by the rotary kernel), so no rotation happens inside a loop: they are plain
FlashAttention-2 over whole rows, with the forward's rounding convention (fp32 dot of the
rounded q_rot and k_rot, then the scale). dQ and dK come out in the rotated space; the
launcher turns them back with one conjugate pass of the rotary kernel (the rotation is
orthogonal up to mscale, so its transpose is the rotation by -phi). dK/dV programs own one
K tile of one kv head and loop over every query head of its GQA group: no atomics, so the
backward is deterministic. Naming legend in kernels/rotary.py.
"""

import triton
import triton.language as tl

from .attention_fwd import LOG2E, key_tile_range, score_mask, sequence_bounds
from .rotary import load_block, store_block, widen


@triton.jit(do_not_specialize=["SEQ"])
def attention_bwd_preprocess_kernel(p_out, p_do, p_delta, SEQ, HEAD_DIM,
                                    stride_ob, stride_oh, stride_os, stride_od,
                                    stride_dob, stride_doh, stride_dos, stride_dod,
                                    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, INT64: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, (batch, heads, seq) contiguous. Grid: (cdiv(SEQ, BLOCK_M), batch, heads)."""
    i_m, i_b, i_h = tl.program_id(0), widen(tl.program_id(1), INT64), widen(tl.program_id(2), INT64)
    n_h = tl.num_programs(2)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < SEQ
    o_m = widen(o_m, INT64)  # row offsets; the mask above stays int32
    o_d = tl.arange(0, BLOCK_DV)
    m_d = o_d < HEAD_DIM
    b_o = load_block(p_out + i_b * stride_ob + i_h * stride_oh, o_m, m_m, stride_os, stride_od, o_d, m_d)
    b_do = load_block(p_do + i_b * stride_dob + i_h * stride_doh, o_m, m_m, stride_dos, stride_dod, o_d, m_d)
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    tl.store(p_delta + (i_b * n_h + i_h) * SEQ + o_m, b_delta, mask=m_m)


@triton.jit
def _dkdv_inner(b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, qk_scale, o_n, len_q, len_k, m_lo, m_hi,
                stride_qs, stride_qd, stride_dos, stride_dod, stride_ls, o_d, m_d,
                MASK_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64: tl.constexpr):
    """Accumulate dK (rotated space, pre-scale) and dV of one K tile over Q tiles [m_lo, m_hi).

    Works on transposed scores [BLOCK_N, BLOCK_M] (q loaded as q^T), as the Triton tutorial does:
    P^T and dS^T are then the left operands of their dots and never need a register transpose."""
    for start_m in range(m_lo, m_hi, BLOCK_M):
        o_m = start_m + tl.arange(0, BLOCK_M)
        m_m = o_m < len_q
        o_mw = widen(o_m, INT64)  # row offsets; masks use o_m
        b_qT = tl.load(p_q + o_mw[None, :] * stride_qs + o_d[:, None] * stride_qd, mask=m_d[:, None] & m_m[None, :],
                       other=0.0)
        b_lse = tl.load(p_lse + o_m * stride_ls, mask=m_m, other=float("inf"))
        b_delta = tl.load(p_delta + o_m, mask=m_m, other=0.0)
        b_sT = tl.dot(b_k, b_qT, input_precision=DOT_PRECISION) * qk_scale
        b_pT = tl.math.exp2(b_sT - b_lse[None, :])
        b_pT = tl.where(tl.trans(score_mask(o_m, o_n, len_q, len_k, MASK_CAUSAL)), b_pT, 0.0)
        b_do = load_block(p_do, o_mw, m_m, stride_dos, stride_dod, o_d, m_d)
        b_dv += tl.dot(b_pT.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
        b_dpT = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)
        b_dsT = (b_pT * (b_dpT - b_delta[None, :])).to(b_qT.dtype)
        b_dk += tl.dot(b_dsT, tl.trans(b_qT), input_precision=DOT_PRECISION)
    return b_dk, b_dv


@triton.jit(do_not_specialize=["SEQ_Q", "SEQ_K", "GROUP", "N_HQ", "DELTA_SEQ", "stride_lb", "stride_lh"])
def attention_bwd_dkdv_kernel(
    p_q, p_k, p_v, p_do, p_lse, p_delta, p_dk, p_dv, p_cu_q, p_cu_k,
    # runtime scalars
    softmax_scale, SEQ_Q, SEQ_K, HEAD_DIM, GROUP, N_HQ, DELTA_SEQ,
    # strides (batch, head, seq, dim) of q_rot, k_rot, v, do, dk, dv; (batch, head, seq) of lse
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    stride_lb, stride_lh, stride_ls,
    # meta-parameters
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid: (cdiv(max Sk, BLOCK_N), batch or n_seqs, kv_heads). dK (rotated space), dV summed over the GQA group."""
    i_n, i_b, i_hk = tl.program_id(0), tl.program_id(1), widen(tl.program_id(2), INT64)
    q_start, len_q, k_start, len_k = sequence_bounds(p_cu_q, p_cu_k, i_b, SEQ_Q, SEQ_K, IS_VARLEN, INT64)
    start_n = i_n * BLOCK_N
    if start_n >= len_k:
        return
    i_bt = 0 if IS_VARLEN else widen(i_b, INT64)
    qk_scale = softmax_scale * LOG2E

    o_n = start_n + tl.arange(0, BLOCK_N)
    m_n = o_n < len_k
    o_nw = widen(o_n, INT64)  # row offsets; masks use o_n
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    b_k = load_block(p_k + i_bt * stride_kb + i_hk * stride_kh + k_start * stride_ks, o_nw, m_n, stride_ks,
                     stride_kd, o_d, m_d)
    b_v = load_block(p_v + i_bt * stride_vb + i_hk * stride_vh + k_start * stride_vs, o_nw, m_n, stride_vs,
                     stride_vd, o_d, m_d)

    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        # Query rows that see this whole K tile need no causal mask; earlier rows see part or none.
        m_lo = tl.maximum(start_n - (len_k - len_q), 0) // BLOCK_M * BLOCK_M
        m_full = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - (len_k - len_q), 0), len_q)
        m_full = (m_full + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        m_lo = 0
        m_full = 0
    for i_g in range(GROUP):
        i_h = i_hk * GROUP + i_g
        p_qh = p_q + i_bt * stride_qb + i_h * stride_qh + q_start * stride_qs
        p_doh = p_do + i_bt * stride_dob + i_h * stride_doh + q_start * stride_dos
        p_lseh = p_lse + i_bt * stride_lb + i_h * stride_lh + q_start * stride_ls
        p_deltah = p_delta + (i_bt * N_HQ + i_h) * DELTA_SEQ + q_start
        b_dk, b_dv = _dkdv_inner(b_dk, b_dv, b_k, b_v, p_qh, p_doh, p_lseh, p_deltah, qk_scale, o_n, len_q, len_k,
                                 m_lo, m_full, stride_qs, stride_qd, stride_dos, stride_dod, stride_ls, o_d, m_d,
                                 CAUSAL, BLOCK_M, DOT_PRECISION, INT64)
        b_dk, b_dv = _dkdv_inner(b_dk, b_dv, b_k, b_v, p_qh, p_doh, p_lseh, p_deltah, qk_scale, o_n, len_q, len_k,
                                 tl.maximum(m_lo, m_full), len_q, stride_qs, stride_qd, stride_dos, stride_dod,
                                 stride_ls, o_d, m_d, False, BLOCK_M, DOT_PRECISION, INT64)

    # d(q.k) = softmax_scale * dS
    store_block(p_dk + i_bt * stride_dkb + i_hk * stride_dkh + k_start * stride_dks, b_dk * softmax_scale, o_nw, m_n,
                stride_dks, stride_dkd, o_d, m_d)
    store_block(p_dv + i_bt * stride_dvb + i_hk * stride_dvh + k_start * stride_dvs, b_dv, o_nw, m_n, stride_dvs,
                stride_dvd, o_d, m_d)


@triton.jit
def _dq_inner(b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, qk_scale, o_m, len_q, len_k, n_lo, n_hi,
              stride_ks, stride_kd, stride_vs, stride_vd, o_d, m_d,
              MASK_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64: tl.constexpr):
    """Accumulate dQ (rotated space, pre-scale) of one Q tile over K tiles [n_lo, n_hi)."""
    for start_n in range(n_lo, n_hi, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < len_k
        o_nw = widen(o_n, INT64)  # row offsets; masks use o_n
        b_k = load_block(p_k, o_nw, m_n, stride_ks, stride_kd, o_d, m_d)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale
        b_p = tl.math.exp2(b_s - b_lse[:, None])
        b_p = tl.where(score_mask(o_m, o_n, len_q, len_k, MASK_CAUSAL), b_p, 0.0)
        b_v = load_block(p_v, o_nw, m_n, stride_vs, stride_vd, o_d, m_d)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
        b_ds = (b_p * (b_dp - b_delta[:, None])).to(b_k.dtype)
        b_dq += tl.dot(b_ds, b_k, input_precision=DOT_PRECISION)
    return b_dq


@triton.jit(do_not_specialize=["SEQ_Q", "SEQ_K", "GROUP", "N_HQ", "DELTA_SEQ", "stride_lb", "stride_lh"])
def attention_bwd_dq_kernel(
    p_q, p_k, p_v, p_do, p_lse, p_delta, p_dq, p_cu_q, p_cu_k,
    # runtime scalars
    softmax_scale, SEQ_Q, SEQ_K, HEAD_DIM, GROUP, N_HQ, DELTA_SEQ,
    # strides (batch, head, seq, dim) of q_rot, k_rot, v, do, dq; (batch, head, seq) of lse
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    stride_lb, stride_lh, stride_ls,
    # meta-parameters
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid: (cdiv(max Sq, BLOCK_M), batch or n_seqs, q_heads). dQ in the rotated space."""
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (last, causal) Q tiles first, as the forward
    i_b, i_h = tl.program_id(1), widen(tl.program_id(2), INT64)
    q_start, len_q, k_start, len_k = sequence_bounds(p_cu_q, p_cu_k, i_b, SEQ_Q, SEQ_K, IS_VARLEN, INT64)
    start_m = i_m * BLOCK_M
    if start_m >= len_q:
        return
    i_bt = 0 if IS_VARLEN else widen(i_b, INT64)
    i_hk = i_h // GROUP
    qk_scale = softmax_scale * LOG2E

    o_m = start_m + tl.arange(0, BLOCK_M)
    m_m = o_m < len_q
    o_mw = widen(o_m, INT64)  # row offsets; masks use o_m
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    b_q = load_block(p_q + i_bt * stride_qb + i_h * stride_qh + q_start * stride_qs, o_mw, m_m, stride_qs, stride_qd,
                     o_d, m_d)
    b_do = load_block(p_do + i_bt * stride_dob + i_h * stride_doh + q_start * stride_dos, o_mw, m_m, stride_dos,
                      stride_dod, o_d, m_d)
    b_lse = tl.load(p_lse + i_bt * stride_lb + i_h * stride_lh + (q_start + o_m) * stride_ls, mask=m_m,
                    other=float("inf"))
    b_delta = tl.load(p_delta + (i_bt * N_HQ + i_h) * DELTA_SEQ + q_start + o_m, mask=m_m, other=0.0)

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    p_kh = p_k + i_bt * stride_kb + i_hk * stride_kh + k_start * stride_ks
    p_vh = p_v + i_bt * stride_vb + i_hk * stride_vh + k_start * stride_vs
    n_full, n_end = key_tile_range(start_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    b_dq = _dq_inner(b_dq, b_q, b_do, b_lse, b_delta, p_kh, p_vh, qk_scale, o_m, len_q, len_k, 0, n_full,
                     stride_ks, stride_kd, stride_vs, stride_vd, o_d, m_d, False, BLOCK_N, DOT_PRECISION, INT64)
    b_dq = _dq_inner(b_dq, b_q, b_do, b_lse, b_delta, p_kh, p_vh, qk_scale, o_m, len_q, len_k, n_full, n_end,
                     stride_ks, stride_kd, stride_vs, stride_vd, o_d, m_d, CAUSAL, BLOCK_N, DOT_PRECISION, INT64)
    store_block(p_dq + i_bt * stride_dqb + i_h * stride_dqh + q_start * stride_dqs, b_dq * softmax_scale, o_mw, m_m,
                stride_dqs, stride_dqd, o_d, m_d)

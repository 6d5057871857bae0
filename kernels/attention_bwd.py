"""Fused LongRoPE attention, backward: the FlashAttention-2 dK/dV loop and dQ loop.

Scores are recomputed from the rotated tiles exactly as in the forward (same split
layout, same tables); dQ and dK are accumulated in the rotated space and rotated back
by the conjugate rotation in the epilogue (the rotation is orthogonal up to mscale, so
its transpose is the rotation by -phi). dK/dV programs own one K tile of one kv head
and loop over every query head of its GQA group: no atomics, so the backward is
deterministic. Naming legend in kernels/rotary.py.
"""

import triton
import triton.language as tl

from .attention_fwd import (LOG2E, key_tile_range, load_rope_tile, score_mask, sequence_bounds,
                            split_scores)
from .rotary import head_dim_offsets, load_block, rotate_pair, store_block, store_pairs, widen

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
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
def _dkdv_inner(b_dk1, b_dk2, b_dkp, b_dv, b_k1, b_k2, b_kp, b_v, p_q, p_do, p_lse, p_delta, p_qpos, p_tab,
                tab_rows, start_token, regime_set, qk_scale, o_n, len_q, len_k, m_lo, m_hi,
                stride_qs, stride_qd, stride_dos, stride_dod, stride_ls, stride_qps,
                o_f, m_f, o_p, m_p, o_dv, m_dv,
                HALF: tl.constexpr, HAS_PASS: tl.constexpr, INTERLEAVED: tl.constexpr, ROTATE_Q: tl.constexpr,
                MASK_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64: tl.constexpr):
    """Accumulate dK (rotated space, pre-scale) and dV of one K tile over Q tiles [m_lo, m_hi)."""
    dtype = b_k1.dtype
    for start_m in range(m_lo, m_hi, BLOCK_M):
        o_m = start_m + tl.arange(0, BLOCK_M)
        m_m = o_m < len_q
        o_mw = widen(o_m, INT64)  # row offsets; masks use o_m
        b_q1, b_q2, b_qp, _, _ = load_rope_tile(p_q, p_qpos, o_mw, m_m, stride_qs, stride_qd,
                                                stride_qps, p_tab, tab_rows, start_token, regime_set, o_f, m_f, o_p,
                                                m_p, HALF, HAS_PASS, INTERLEAVED, ROTATE_Q)
        b_q1, b_q2, b_qp = b_q1.to(dtype), b_q2.to(dtype), b_qp.to(dtype)
        b_lse = tl.load(p_lse + o_m * stride_ls, mask=m_m, other=float("inf"))
        b_delta = tl.load(p_delta + o_m, mask=m_m, other=0.0)
        b_s = split_scores(b_q1, b_q2, b_qp, b_k1, b_k2, b_kp, HAS_PASS, DOT_PRECISION) * qk_scale
        b_p = tl.math.exp2(b_s - b_lse[:, None])
        b_p = tl.where(score_mask(o_m, o_n, len_q, len_k, MASK_CAUSAL), b_p, 0.0)
        b_do = load_block(p_do, o_mw, m_m, stride_dos, stride_dod, o_dv, m_dv)
        b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=DOT_PRECISION)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
        b_ds = (b_p * (b_dp - b_delta[:, None])).to(dtype)
        b_dk1 += tl.dot(tl.trans(b_ds), b_q1, input_precision=DOT_PRECISION)
        b_dk2 += tl.dot(tl.trans(b_ds), b_q2, input_precision=DOT_PRECISION)
        if HAS_PASS:
            b_dkp += tl.dot(tl.trans(b_ds), b_qp, input_precision=DOT_PRECISION)
    return b_dk1, b_dk2, b_dkp, b_dv


@triton.jit
def attention_bwd_dkdv_kernel(
    p_q, p_k, p_v, p_do, p_lse, p_delta, p_dk, p_dv, p_qpos, p_kpos, p_tab, p_seq_set, p_cu_q, p_cu_k,
    # runtime scalars
    softmax_scale, tab_rows, start_token, SEQ_Q, SEQ_K, HEAD_DIM, GROUP, N_HQ, DELTA_SEQ,
    # strides (batch, head, seq, dim) of q, k, v, do, dk, dv; (batch, head, seq) of lse; (batch, seq) of positions
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    stride_lb, stride_lh, stride_ls,
    stride_qpb, stride_qps, stride_kpb, stride_kps,
    # meta-parameters
    ROTARY_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, INTERLEAVED: tl.constexpr, ROTATE_Q: tl.constexpr, ROTATE_K: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid: (cdiv(max Sk, BLOCK_N), batch or n_seqs, kv_heads). dK, dV summed over the GQA group."""
    i_n, i_b, i_hk = tl.program_id(0), tl.program_id(1), widen(tl.program_id(2), INT64)
    HALF: tl.constexpr = ROTARY_DIM // 2
    HAS_PASS: tl.constexpr = BLOCK_PASS > 0
    q_start, len_q, k_start, len_k = sequence_bounds(p_cu_q, p_cu_k, i_b, SEQ_Q, SEQ_K, IS_VARLEN, INT64)
    start_n = i_n * BLOCK_N
    if start_n >= len_k:
        return
    i_bt = 0 if IS_VARLEN else widen(i_b, INT64)
    regime_set = tl.load(p_seq_set + i_b)
    qk_scale = softmax_scale * LOG2E

    o_n = start_n + tl.arange(0, BLOCK_N)
    m_n = o_n < len_k
    o_nw = widen(o_n, INT64)  # row offsets; masks use o_n
    o_f, m_f, o_p, m_p, o_dv, m_dv = head_dim_offsets(HEAD_DIM, ROTARY_DIM, BLOCK_HALF, BLOCK_PASS, BLOCK_DV)

    p_kpos += i_bt * stride_kpb + k_start * stride_kps
    p_qpos += i_bt * stride_qpb + q_start * stride_qps
    b_k1, b_k2, b_kp, b_cos, b_sin = load_rope_tile(
        p_k + i_bt * stride_kb + i_hk * stride_kh + k_start * stride_ks, p_kpos, o_nw, m_n, stride_ks, stride_kd,
        stride_kps, p_tab, tab_rows, start_token, regime_set, o_f, m_f, o_p, m_p, HALF, HAS_PASS, INTERLEAVED,
        ROTATE_K)
    dtype = p_k.dtype.element_ty
    b_k1, b_k2, b_kp = b_k1.to(dtype), b_k2.to(dtype), b_kp.to(dtype)
    b_v = load_block(p_v + i_bt * stride_vb + i_hk * stride_vh + k_start * stride_vs, o_nw, m_n, stride_vs,
                     stride_vd, o_dv, m_dv)

    b_dk1 = tl.zeros([BLOCK_N, BLOCK_HALF], dtype=tl.float32)
    b_dk2 = tl.zeros([BLOCK_N, BLOCK_HALF], dtype=tl.float32)
    b_dkp = tl.zeros([BLOCK_N, BLOCK_PASS if HAS_PASS else BLOCK_HALF], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
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
        b_dk1, b_dk2, b_dkp, b_dv = _dkdv_inner(
            b_dk1, b_dk2, b_dkp, b_dv, b_k1, b_k2, b_kp, b_v, p_qh, p_doh, p_lseh, p_deltah, p_qpos, p_tab,
            tab_rows, start_token, regime_set, qk_scale, o_n, len_q, len_k, m_lo, m_full, stride_qs, stride_qd,
            stride_dos, stride_dod, stride_ls, stride_qps, o_f, m_f, o_p, m_p, o_dv, m_dv, HALF, HAS_PASS,
            INTERLEAVED, ROTATE_Q, CAUSAL, BLOCK_M, DOT_PRECISION, INT64)
        b_dk1, b_dk2, b_dkp, b_dv = _dkdv_inner(
            b_dk1, b_dk2, b_dkp, b_dv, b_k1, b_k2, b_kp, b_v, p_qh, p_doh, p_lseh, p_deltah, p_qpos, p_tab,
            tab_rows, start_token, regime_set, qk_scale, o_n, len_q, len_k, tl.maximum(m_lo, m_full), len_q,
            stride_qs, stride_qd, stride_dos, stride_dod, stride_ls, stride_qps, o_f, m_f, o_p, m_p, o_dv, m_dv,
            HALF, HAS_PASS, INTERLEAVED, ROTATE_Q, False, BLOCK_M, DOT_PRECISION, INT64)

    # d(q.k) = softmax_scale * dS; back to the caller's (un-rotated) space by the conjugate rotation.
    b_dk1 *= softmax_scale
    b_dk2 *= softmax_scale
    if ROTATE_K:
        b_dk1, b_dk2 = rotate_pair(b_dk1, b_dk2, b_cos, b_sin, True)
    p_dkh = p_dk + i_bt * stride_dkb + i_hk * stride_dkh + k_start * stride_dks
    store_pairs(p_dkh, b_dk1, b_dk2, o_nw, m_n, stride_dks, stride_dkd, o_f, m_f, HALF, INTERLEAVED)
    if HAS_PASS:
        store_block(p_dkh, b_dkp * softmax_scale, o_nw, m_n, stride_dks, stride_dkd, o_p, m_p)
    store_block(p_dv + i_bt * stride_dvb + i_hk * stride_dvh + k_start * stride_dvs, b_dv, o_nw, m_n, stride_dvs,
                stride_dvd, o_dv, m_dv)


@triton.jit
def _dq_inner(b_dq1, b_dq2, b_dqp, b_q1, b_q2, b_qp, b_do, b_lse, b_delta, p_k, p_v, p_kpos, p_tab, tab_rows,
              start_token, regime_set, qk_scale, o_m, len_q, len_k, n_lo, n_hi,
              stride_ks, stride_kd, stride_vs, stride_vd, stride_kps, o_f, m_f, o_p, m_p, o_dv, m_dv,
              HALF: tl.constexpr, HAS_PASS: tl.constexpr, INTERLEAVED: tl.constexpr, ROTATE_K: tl.constexpr,
              MASK_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64: tl.constexpr):
    """Accumulate dQ (rotated space, pre-scale) of one Q tile over K tiles [n_lo, n_hi)."""
    dtype = b_q1.dtype
    for start_n in range(n_lo, n_hi, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < len_k
        o_nw = widen(o_n, INT64)  # row offsets; masks use o_n
        b_k1, b_k2, b_kp, _, _ = load_rope_tile(p_k, p_kpos, o_nw, m_n, stride_ks, stride_kd,
                                                stride_kps, p_tab, tab_rows, start_token, regime_set, o_f, m_f, o_p,
                                                m_p, HALF, HAS_PASS, INTERLEAVED, ROTATE_K)
        b_k1, b_k2, b_kp = b_k1.to(dtype), b_k2.to(dtype), b_kp.to(dtype)
        b_s = split_scores(b_q1, b_q2, b_qp, b_k1, b_k2, b_kp, HAS_PASS, DOT_PRECISION) * qk_scale
        b_p = tl.math.exp2(b_s - b_lse[:, None])
        b_p = tl.where(score_mask(o_m, o_n, len_q, len_k, MASK_CAUSAL), b_p, 0.0)
        b_v = load_block(p_v, o_nw, m_n, stride_vs, stride_vd, o_dv, m_dv)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
        b_ds = (b_p * (b_dp - b_delta[:, None])).to(dtype)
        b_dq1 += tl.dot(b_ds, b_k1, input_precision=DOT_PRECISION)
        b_dq2 += tl.dot(b_ds, b_k2, input_precision=DOT_PRECISION)
        if HAS_PASS:
            b_dqp += tl.dot(b_ds, b_kp, input_precision=DOT_PRECISION)
    return b_dq1, b_dq2, b_dqp


@triton.jit
def attention_bwd_dq_kernel(
    p_q, p_k, p_v, p_do, p_lse, p_delta, p_dq, p_qpos, p_kpos, p_tab, p_seq_set, p_cu_q, p_cu_k,
    # runtime scalars
    softmax_scale, tab_rows, start_token, SEQ_Q, SEQ_K, HEAD_DIM, GROUP, N_HQ, DELTA_SEQ,
    # strides (batch, head, seq, dim) of q, k, v, do, dq; (batch, head, seq) of lse; (batch, seq) of positions
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    stride_lb, stride_lh, stride_ls,
    stride_qpb, stride_qps, stride_kpb, stride_kps,
    # meta-parameters
    ROTARY_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, INTERLEAVED: tl.constexpr, ROTATE_Q: tl.constexpr, ROTATE_K: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid: (cdiv(max Sq, BLOCK_M), batch or n_seqs, q_heads)."""
    i_m, i_b, i_h = tl.program_id(0), tl.program_id(1), widen(tl.program_id(2), INT64)
    HALF: tl.constexpr = ROTARY_DIM // 2
    HAS_PASS: tl.constexpr = BLOCK_PASS > 0
    q_start, len_q, k_start, len_k = sequence_bounds(p_cu_q, p_cu_k, i_b, SEQ_Q, SEQ_K, IS_VARLEN, INT64)
    start_m = i_m * BLOCK_M
    if start_m >= len_q:
        return
    i_bt = 0 if IS_VARLEN else widen(i_b, INT64)
    i_hk = i_h // GROUP
    regime_set = tl.load(p_seq_set + i_b)
    qk_scale = softmax_scale * LOG2E

    o_m = start_m + tl.arange(0, BLOCK_M)
    m_m = o_m < len_q
    o_mw = widen(o_m, INT64)  # row offsets; masks use o_m
    o_f, m_f, o_p, m_p, o_dv, m_dv = head_dim_offsets(HEAD_DIM, ROTARY_DIM, BLOCK_HALF, BLOCK_PASS, BLOCK_DV)

    p_qpos += i_bt * stride_qpb + q_start * stride_qps
    p_kpos += i_bt * stride_kpb + k_start * stride_kps
    p_qh = p_q + i_bt * stride_qb + i_h * stride_qh + q_start * stride_qs
    b_q1, b_q2, b_qp, b_cos, b_sin = load_rope_tile(p_qh, p_qpos, o_mw, m_m, stride_qs, stride_qd, stride_qps, p_tab,
                                                    tab_rows, start_token, regime_set, o_f, m_f, o_p, m_p, HALF,
                                                    HAS_PASS, INTERLEAVED, ROTATE_Q)
    dtype = p_q.dtype.element_ty
    b_q1, b_q2, b_qp = b_q1.to(dtype), b_q2.to(dtype), b_qp.to(dtype)
    b_do = load_block(p_do + i_bt * stride_dob + i_h * stride_doh + q_start * stride_dos, o_mw, m_m, stride_dos,
                      stride_dod, o_dv, m_dv)
    b_lse = tl.load(p_lse + i_bt * stride_lb + i_h * stride_lh + (q_start + o_m) * stride_ls, mask=m_m,
                    other=float("inf"))
    b_delta = tl.load(p_delta + (i_bt * N_HQ + i_h) * DELTA_SEQ + q_start + o_m, mask=m_m, other=0.0)

    b_dq1 = tl.zeros([BLOCK_M, BLOCK_HALF], dtype=tl.float32)
    b_dq2 = tl.zeros([BLOCK_M, BLOCK_HALF], dtype=tl.float32)
    b_dqp = tl.zeros([BLOCK_M, BLOCK_PASS if HAS_PASS else BLOCK_HALF], dtype=tl.float32)
    p_kh = p_k + i_bt * stride_kb + i_hk * stride_kh + k_start * stride_ks
    p_vh = p_v + i_bt * stride_vb + i_hk * stride_vh + k_start * stride_vs
    n_full, n_end = key_tile_range(start_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    b_dq1, b_dq2, b_dqp = _dq_inner(b_dq1, b_dq2, b_dqp, b_q1, b_q2, b_qp, b_do, b_lse, b_delta, p_kh, p_vh, p_kpos,
                                    p_tab, tab_rows, start_token, regime_set, qk_scale, o_m, len_q, len_k, 0, n_full,
                                    stride_ks, stride_kd, stride_vs, stride_vd, stride_kps, o_f, m_f, o_p, m_p, o_dv,
                                    m_dv, HALF, HAS_PASS, INTERLEAVED, ROTATE_K, False, BLOCK_N, DOT_PRECISION, INT64)
    b_dq1, b_dq2, b_dqp = _dq_inner(b_dq1, b_dq2, b_dqp, b_q1, b_q2, b_qp, b_do, b_lse, b_delta, p_kh, p_vh, p_kpos,
                                    p_tab, tab_rows, start_token, regime_set, qk_scale, o_m, len_q, len_k, n_full,
                                    n_end, stride_ks, stride_kd, stride_vs, stride_vd, stride_kps, o_f, m_f, o_p, m_p,
                                    o_dv, m_dv, HALF, HAS_PASS, INTERLEAVED, ROTATE_K, CAUSAL, BLOCK_N,
                                    DOT_PRECISION, INT64)
    b_dq1 *= softmax_scale
    b_dq2 *= softmax_scale
    if ROTATE_Q:
        b_dq1, b_dq2 = rotate_pair(b_dq1, b_dq2, b_cos, b_sin, True)
    p_dqh = p_dq + i_bt * stride_dqb + i_h * stride_dqh + q_start * stride_dqs
    store_pairs(p_dqh, b_dq1, b_dq2, o_mw, m_m, stride_dqs, stride_dqd, o_f, m_f, HALF, INTERLEAVED)
    if HAS_PASS:
        store_block(p_dqh, b_dqp * softmax_scale, o_mw, m_m, stride_dqs, stride_dqd, o_p, m_p)

"""Fused LongRoPE attention, forward: FlashAttention-2 tiling with the rotation in the prologue.

Q and K tiles are loaded split into the two members of each rotated pair (x1, x2) plus
the pass-through dims (xp). Because q.k is invariant to a common permutation of the
head dimension, the scores are dot(q1, k1) + dot(q2, k2) + dot(qp, kp): the rotation
needs no in-register shuffle. Q is rotated once per Q tile with mscale (in the table)
and softmax_scale * log2(e) folded in; K is rotated once per K tile load from the
split-position tables (ROTATE_K), or read pre-rotated (a KV cache). Naming legend in
kernels/rotary.py.
"""

import triton
import triton.language as tl

from .rotary import head_dim_offsets, load_block, load_pairs, positions_cos_sin, rotate_pair, widen

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def sequence_bounds(p_cu_q, p_cu_k, i_b, SEQ_Q, SEQ_K, IS_VARLEN: tl.constexpr, INT64: tl.constexpr):
    """(q start row, q length, k start row, k length) of sequence i_b (packed or batched);
    the starts in the offset type (they multiply row strides)."""
    if IS_VARLEN:
        q_start = tl.load(p_cu_q + i_b).to(tl.int32)
        k_start = tl.load(p_cu_k + i_b).to(tl.int32)
        len_q = tl.load(p_cu_q + i_b + 1).to(tl.int32) - q_start
        len_k = tl.load(p_cu_k + i_b + 1).to(tl.int32) - k_start
    else:
        q_start, len_q, k_start, len_k = 0, SEQ_Q, 0, SEQ_K
    return widen(q_start, INT64), len_q, widen(k_start, INT64), len_k


@triton.jit
def key_tile_range(start_m, len_q, len_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(n_full, n_end) for a Q tile: keys [0, n_full) are seen in full by every row of the tile
    (no causal mask needed), [n_full, n_end) is the diagonal band; bottom-right aligned."""
    if CAUSAL:
        diag = start_m + len_k - len_q
        return (tl.minimum(tl.maximum(diag + 1, 0), len_k) // BLOCK_N * BLOCK_N,
                tl.minimum(tl.maximum(diag + BLOCK_M, 0), len_k))
    return 0, len_k


@triton.jit
def load_rope_tile(p_x, p_pos, o_s, m_s, stride_s, stride_d, stride_ps, p_tab, tab_rows, start_token, regime_set,
                   o_f, m_f, o_p, m_p, HALF: tl.constexpr, HAS_PASS: tl.constexpr, INTERLEAVED: tl.constexpr,
                   ROTATE: tl.constexpr):
    """A q or k tile as (x1, x2, xp, cos, sin): pairs rotated when ROTATE (fp32), pass-through dims as loaded."""
    b_x1, b_x2 = load_pairs(p_x, o_s, m_s, stride_s, stride_d, o_f, m_f, HALF, INTERLEAVED)
    if ROTATE:
        b_cos, b_sin = positions_cos_sin(p_pos, o_s, m_s, stride_ps, p_tab, tab_rows, start_token, regime_set,
                                         o_f, m_f, HALF)
        b_x1, b_x2 = rotate_pair(b_x1, b_x2, b_cos, b_sin, False)
    else:
        b_cos = b_x1
        b_sin = b_x2
    if HAS_PASS:
        b_xp = load_block(p_x, o_s, m_s, stride_s, stride_d, o_p, m_p)
    else:
        b_xp = b_x1
    return b_x1, b_x2, b_xp, b_cos, b_sin


@triton.jit
def split_scores(b_q1, b_q2, b_qp, b_k1, b_k2, b_kp, HAS_PASS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """q k^T over the split head dimension: [BLOCK_M, BLOCK_N] fp32."""
    b_s = tl.dot(b_q1, tl.trans(b_k1), input_precision=DOT_PRECISION)
    b_s += tl.dot(b_q2, tl.trans(b_k2), input_precision=DOT_PRECISION)
    if HAS_PASS:
        b_s += tl.dot(b_qp, tl.trans(b_kp), input_precision=DOT_PRECISION)
    return b_s


@triton.jit
def score_mask(o_m, o_n, len_q, len_k, CAUSAL: tl.constexpr):
    """Valid (row, col) pairs: inside both sequences and, if CAUSAL, col <= row + len_k - len_q."""
    m = (o_m[:, None] < len_q) & (o_n[None, :] < len_k)
    if CAUSAL:
        m = m & (o_n[None, :] <= o_m[:, None] + (len_k - len_q))
    return m


@triton.jit
def _fwd_inner(b_acc, b_l, b_m, b_q1, b_q2, b_qp, p_k, p_v, p_kpos, p_tab, tab_rows, start_token, regime_set,
               o_m, len_q, len_k, n_lo, n_hi, stride_ks, stride_kd, stride_vs, stride_vd, stride_kps,
               o_f, m_f, o_p, m_p, o_dv, m_dv,
               HALF: tl.constexpr, HAS_PASS: tl.constexpr, INTERLEAVED: tl.constexpr, ROTATE_K: tl.constexpr,
               MASK_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64: tl.constexpr):
    """Online softmax (base 2) over K tiles [n_lo, n_hi); causal masking only where MASK_CAUSAL."""
    dtype = b_q1.dtype
    for start_n in range(n_lo, n_hi, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < len_k
        o_nw = widen(o_n, INT64)  # row offsets; masks use o_n
        b_k1, b_k2, b_kp, _, _ = load_rope_tile(p_k, p_kpos, o_nw, m_n, stride_ks, stride_kd,
                                                stride_kps, p_tab, tab_rows, start_token, regime_set, o_f, m_f, o_p,
                                                m_p, HALF, HAS_PASS, INTERLEAVED, ROTATE_K)
        b_s = split_scores(b_q1, b_q2, b_qp, b_k1.to(dtype), b_k2.to(dtype), b_kp.to(dtype), HAS_PASS,
                           DOT_PRECISION)
        b_s = tl.where(score_mask(o_m, o_n, len_q, len_k, MASK_CAUSAL), b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        # Rows with no visible key yet keep m = -inf; shift by 0 there so exp2 gives 0, not NaN.
        b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_p = tl.math.exp2(b_s - b_shift[:, None])
        b_alpha = tl.math.exp2(b_m - b_shift)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_v = load_block(p_v, o_nw, m_n, stride_vs, stride_vd, o_dv, m_dv)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
        b_m = b_m_new
    return b_acc, b_l, b_m


@triton.jit
def attention_fwd_kernel(
    p_q, p_k, p_v, p_out, p_lse, p_qpos, p_kpos, p_tab, p_seq_set, p_cu_q, p_cu_k,
    # runtime scalars
    qk_scale, tab_rows, start_token, SEQ_Q, SEQ_K, HEAD_DIM, GROUP,
    # strides (batch, head, seq, dim) of q, k, v, out; (batch, head, seq) of lse; (batch, seq) of positions
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    stride_qpb, stride_qps, stride_kpb, stride_kps,
    # meta-parameters
    ROTARY_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, INTERLEAVED: tl.constexpr, ROTATE_Q: tl.constexpr, ROTATE_K: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid: (cdiv(max Sq, BLOCK_M), batch or n_seqs, q_heads). Writes out and the base-2 LSE."""
    i_m, i_b, i_h = tl.program_id(0), tl.program_id(1), widen(tl.program_id(2), INT64)
    HALF: tl.constexpr = ROTARY_DIM // 2
    HAS_PASS: tl.constexpr = BLOCK_PASS > 0
    q_start, len_q, k_start, len_k = sequence_bounds(p_cu_q, p_cu_k, i_b, SEQ_Q, SEQ_K, IS_VARLEN, INT64)
    start_m = i_m * BLOCK_M
    if start_m >= len_q:
        return
    i_bt = 0 if IS_VARLEN else widen(i_b, INT64)  # batch index of the tensors (packed sequences: batch 0)
    i_hk = i_h // GROUP
    regime_set = tl.load(p_seq_set + i_b)

    o_m = start_m + tl.arange(0, BLOCK_M)
    m_m = o_m < len_q
    o_f, m_f, o_p, m_p, o_dv, m_dv = head_dim_offsets(HEAD_DIM, ROTARY_DIM, BLOCK_HALF, BLOCK_PASS, BLOCK_DV)

    p_q += i_bt * stride_qb + i_h * stride_qh + q_start * stride_qs
    p_k += i_bt * stride_kb + i_hk * stride_kh + k_start * stride_ks
    p_v += i_bt * stride_vb + i_hk * stride_vh + k_start * stride_vs
    p_qpos += i_bt * stride_qpb + q_start * stride_qps
    p_kpos += i_bt * stride_kpb + k_start * stride_kps

    o_mw = widen(o_m, INT64)  # row offsets; masks use o_m
    b_q1, b_q2, b_qp, _, _ = load_rope_tile(p_q, p_qpos, o_mw, m_m, stride_qs, stride_qd, stride_qps, p_tab, tab_rows,
                                            start_token, regime_set, o_f, m_f, o_p, m_p, HALF, HAS_PASS,
                                            INTERLEAVED, ROTATE_Q)
    dtype = p_q.dtype.element_ty
    b_q1 = (b_q1 * qk_scale).to(dtype)
    b_q2 = (b_q2 * qk_scale).to(dtype)
    b_qp = (b_qp * qk_scale).to(dtype)

    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    n_full, n_end = key_tile_range(start_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    b_acc, b_l, b_m = _fwd_inner(b_acc, b_l, b_m, b_q1, b_q2, b_qp, p_k, p_v, p_kpos, p_tab, tab_rows, start_token,
                                 regime_set, o_m, len_q, len_k, 0, n_full, stride_ks, stride_kd, stride_vs,
                                 stride_vd, stride_kps, o_f, m_f, o_p, m_p, o_dv, m_dv, HALF, HAS_PASS,
                                 INTERLEAVED, ROTATE_K, False, BLOCK_N, DOT_PRECISION, INT64)
    b_acc, b_l, b_m = _fwd_inner(b_acc, b_l, b_m, b_q1, b_q2, b_qp, p_k, p_v, p_kpos, p_tab, tab_rows, start_token,
                                 regime_set, o_m, len_q, len_k, n_full, n_end, stride_ks, stride_kd, stride_vs,
                                 stride_vd, stride_kps, o_f, m_f, o_p, m_p, o_dv, m_dv, HALF, HAS_PASS,
                                 INTERLEAVED, ROTATE_K, CAUSAL, BLOCK_N, DOT_PRECISION, INT64)
    # Rows that see no key (Sq > Sk, causal) output 0 and get LSE +inf so the backward's p is 0.
    b_empty = b_l == 0.0
    b_out = b_acc / tl.where(b_empty, 1.0, b_l)[:, None]
    b_lse = tl.where(b_empty, float("inf"), b_m + tl.math.log2(tl.where(b_empty, 1.0, b_l)))
    p_out += i_bt * stride_ob + i_h * stride_oh + q_start * stride_os
    tl.store(p_out + o_mw[:, None] * stride_os + o_dv[None, :] * stride_od, b_out,
             mask=m_m[:, None] & m_dv[None, :])
    tl.store(p_lse + i_bt * stride_lb + i_h * stride_lh + (q_start + o_m) * stride_ls, b_lse, mask=m_m)

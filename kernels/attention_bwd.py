"""Fused LongRoPE attention, backward: the FlashAttention-2 dK/dV loop and dQ loop.

Both loops run on the rotated operands the rotary kernel produced, so no rotation happens
inside a loop: they are plain FlashAttention-2 over whole rows, with the forward's rounding
convention (fp32 dot of the rounded q_rot and k_rot, then the scale, here fused with the LSE
subtraction into one FMA). dQ and dK come out in the rotated space; the launcher turns them
back with one conjugate pass of the rotary kernel (the rotation is orthogonal up to mscale,
so its transpose is the rotation by -phi). dK/dV programs own one K tile of one kv head and
loop over every query head of its GQA group: no atomics, so the backward is deterministic.
Causal masks, packed sequences and a static cache's key counts are row ranges, tested only in
masked tiles (kernels/attention_tiles.py). Naming legend in kernels/rotary.py.

Each query row's LSE and delta = rowsum(dO * O) travel together, interleaved in one fp32
(batch, q_heads, Sq, 2) buffer that the preprocess kernel writes: the dK/dV loop needs both
for every column of its transposed tile, and one load of the pair (half the shared-memory
reads) is what keeps that loop within its instruction budget (docs/kernels.md).
"""

import triton
import triton.language as tl

from .attention_tiles import head_base, in_range, load_tile, row_ranges, tile_ranges
from .rotary import load_block, store_block, widen


@triton.jit(do_not_specialize=["SEQ", "stride_lb", "stride_lh"])
def attention_bwd_preprocess_kernel(p_out, p_do, p_lse, p_ld, SEQ, HEAD_DIM,
                                    stride_ob, stride_oh, stride_os, stride_od,
                                    stride_dob, stride_doh, stride_dos, stride_dod,
                                    stride_lb, stride_lh, stride_ls,
                                    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, INT64: tl.constexpr):
    """(lse, delta = rowsum(dO * O)) per row, fp32 pairs (batch, heads, seq, 2) contiguous.
    Grid: (cdiv(SEQ, BLOCK_M), batch, heads)."""
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
    b_lse = tl.load(p_lse + i_b * stride_lb + i_h * stride_lh + o_m * stride_ls, mask=m_m)
    p_row = p_ld + ((i_b * n_h + i_h) * SEQ + o_m) * 2
    tl.store(p_row, b_lse, mask=m_m)
    tl.store(p_row + 1, b_delta, mask=m_m)


@triton.jit
def load_lse_delta(p_ld, o_2, end, BLOCK: tl.constexpr, MASK_ROWS: tl.constexpr):
    """(lse, delta) of BLOCK consecutive rows of the interleaved buffer p_ld, whose 2 * BLOCK values are
    at the offsets o_2; values at or past offset `end` (the end of the head's rows) read 0, tested only
    with MASK_ROWS (full tiles lie inside)."""
    if MASK_ROWS:
        b_ld = tl.load(p_ld + o_2, mask=o_2 < end, other=0.0)
    else:
        b_ld = tl.load(p_ld + o_2)
    return tl.split(tl.reshape(b_ld, [BLOCK, 2]))


@triton.jit
def _dkdv_loop(b_dk, b_dv, b_k, b_v, p_q, p_do, p_ld, ld_row, i_b, i_h0, GROUP, qk_scale, p_lo, p_hi, r_off, o_n, m_n,
               m_lo, m_hi, SEQ_Q, stride_qh, stride_qs, stride_qd, stride_doh, stride_dos, stride_dod, o_d, m_d,
               MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
               USE_TMA: tl.constexpr, INT64: tl.constexpr):
    """Accumulate dK (rotated space, before the softmax scale) and dV of one K tile over the Q tiles
    [m_lo, m_hi) of every query head i_h0 + g of its GQA group; MASKED tiles test each key's query
    range. p_q, p_do are at head i_h0 (head_base); ld_row is head i_h0's first row in p_ld; r_off is the
    batch row's offset in the key ranges p_lo, p_hi.

    One loop over (head, Q tile) pairs, not a head loop around a tile loop: the load pipeline runs
    on from one head to the next, and nothing stays live across an outer loop (at head_dim 128 the
    dK and dV accumulators alone take half of the registers). Works on transposed scores
    [BLOCK_N, BLOCK_M], as the Triton tutorial does: P^T and dS^T are then the left operands of
    their dots and never need a register transpose.

    At head_dim 128 this loop holds every register sm_90 has (the accumulators, S^T/dP^T, P^T and
    the 16 (lse, delta) columns of each thread); on pointer loads, with the next tiles' addresses on
    top, one value more makes ptxas reload it from local memory in every iteration. So the loop keeps
    nothing it can do without: it counts up to a constant bound (no trip count held for the pipeline's
    last-iteration test), and p_ld stays the kernel argument (uniform registers) with the head offset
    folded once into each thread's (lse, delta) offsets o_ld."""
    if MASKED:
        b_lo, b_hi = row_ranges(p_lo, p_hi, r_off + o_n, m_n)
    o_ld = ld_row * 2 + tl.arange(0, 2 * BLOCK_M)
    start_m = m_lo
    i_g = 0
    for _ in range(-tl.maximum(tl.cdiv(m_hi - m_lo, BLOCK_M), 0) * GROUP, 0):
        i_gw = widen(i_g, INT64)
        b_q = load_tile(head_base(p_q, 0, i_gw, 0, stride_qh, USE_TMA), i_b, i_h0 + i_gw, start_m, SEQ_Q, stride_qs,
                        stride_qd, o_d, m_d, BLOCK_M, BLOCK_D, MASKED, USE_TMA, INT64)
        b_lse, b_delta = load_lse_delta(p_ld, (i_gw * SEQ_Q + start_m) * 2 + o_ld, (ld_row + (i_gw + 1) * SEQ_Q) * 2,
                                        BLOCK_M, MASKED)
        b_pT = tl.math.exp2(tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * qk_scale - b_lse[None, :])
        if MASKED:  # also zero for the rows past the tensor (their range is empty)
            b_pT = tl.where(in_range(start_m + tl.arange(0, BLOCK_M), b_lo, b_hi), b_pT, 0.0)
        b_do = load_tile(head_base(p_do, 0, i_gw, 0, stride_doh, USE_TMA), i_b, i_h0 + i_gw, start_m, SEQ_Q,
                         stride_dos, stride_dod, o_d, m_d, BLOCK_M, BLOCK_D, MASKED, USE_TMA, INT64)
        b_dv = tl.dot(b_pT.to(b_do.dtype), b_do, b_dv, input_precision=DOT_PRECISION)
        b_dpT = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)
        b_dsT = (b_pT * (b_dpT - b_delta[None, :])).to(b_q.dtype)
        b_dk = tl.dot(b_dsT, b_q, b_dk, input_precision=DOT_PRECISION)
        # The next tile; after a head's last one, the next head's first.
        start_m += BLOCK_M
        i_g = tl.where(start_m >= m_hi, i_g + 1, i_g)
        start_m = tl.where(start_m >= m_hi, m_lo, start_m)
    return b_dk, b_dv


@triton.jit(do_not_specialize=["SEQ_Q", "SEQ_K", "GROUP", "N_HQ", "stride_rb"])
def attention_bwd_dkdv_kernel(
    p_q, p_k, p_v, p_do, p_ld, p_dk, p_dv, p_lo, p_hi,
    # runtime scalars
    qk_scale, grad_scale, SEQ_Q, SEQ_K, HEAD_DIM, GROUP, N_HQ,
    # strides (batch, head, seq, dim) of q_rot, k_rot, v, do, dk, dv; batch of the key ranges
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd, stride_rb,
    # meta-parameters
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid: (cdiv(Sk, BLOCK_N), batch, kv_heads). p_q, p_do: pointers, or TensorDescriptors when USE_TMA;
    p_ld: the (lse, delta) pairs; p_lo, p_hi: int32 (batch, Sk) with batch stride stride_rb (0 when shared
    by all batch rows), the query rows [lo, hi) that see each key.
    dK (rotated space, times grad_scale) and dV, summed over the GQA group."""
    i_n, i_b, i_hk = tl.program_id(0), widen(tl.program_id(1), INT64), widen(tl.program_id(2), INT64)
    r_off = i_b * stride_rb  # the batch row's key ranges (kernels/attention_tiles.batch_ranges)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < SEQ_K
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    b_k = load_tile(p_k + i_b * stride_kb + i_hk * stride_kh, i_b, i_hk, i_n * BLOCK_N, SEQ_K, stride_ks, stride_kd,
                    o_d, m_d, BLOCK_N, BLOCK_D, True, False, INT64)
    b_v = load_tile(p_v + i_b * stride_vb + i_hk * stride_vh, i_b, i_hk, i_n * BLOCK_N, SEQ_K, stride_vs, stride_vd,
                    o_d, m_d, BLOCK_N, BLOCK_D, True, False, INT64)
    i_h0 = i_hk * GROUP
    p_qg = head_base(p_q, i_b, i_h0, stride_qb, stride_qh, USE_TMA)
    p_dog = head_base(p_do, i_b, i_h0, stride_dob, stride_doh, USE_TMA)

    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i in tl.static_range(3):  # masked, full, masked
        # Each loop's bounds are read just before it, so none is held through the loops before it.
        bounds = tile_ranges(p_lo, p_hi, r_off + i_n * BLOCK_N, r_off + tl.minimum(i_n * BLOCK_N + BLOCK_N, SEQ_K) - 1,
                             BLOCK_M)
        b_dk, b_dv = _dkdv_loop(b_dk, b_dv, b_k, b_v, p_qg, p_dog, p_ld, (i_b * N_HQ + i_h0) * SEQ_Q, i_b, i_h0, GROUP,
                                qk_scale, p_lo, p_hi, r_off, o_n, m_n, bounds[i], bounds[i + 1], SEQ_Q, stride_qh,
                                stride_qs, stride_qd, stride_doh, stride_dos, stride_dod, o_d, m_d, i != 1, BLOCK_M,
                                BLOCK_D, DOT_PRECISION, USE_TMA, INT64)
    o_nw = widen(o_n, INT64)
    store_block(p_dk + i_b * stride_dkb + i_hk * stride_dkh, b_dk * grad_scale, o_nw, m_n, stride_dks, stride_dkd,
                o_d, m_d)
    store_block(p_dv + i_b * stride_dvb + i_hk * stride_dvh, b_dv, o_nw, m_n, stride_dvs, stride_dvd, o_d, m_d)


@triton.jit
def _dq_loop(b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, i_b, i_hk, qk_scale, p_lo, p_hi, r_off, o_m, m_m, n_lo, n_hi,
             SEQ_K, stride_ks, stride_kd, stride_vs, stride_vd, o_d, m_d,
             MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
             USE_TMA: tl.constexpr, INT64: tl.constexpr):
    """Accumulate dQ (rotated space, before the softmax scale) of one Q tile over the K tiles [n_lo, n_hi);
    MASKED tiles test each row's key range (at r_off + o_m in p_lo, p_hi)."""
    if MASKED:
        b_lo, b_hi = row_ranges(p_lo, p_hi, r_off + o_m, m_m)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        b_k = load_tile(p_k, i_b, i_hk, start_n, SEQ_K, stride_ks, stride_kd, o_d, m_d, BLOCK_N, BLOCK_D, MASKED,
                        USE_TMA, INT64)
        b_p = tl.math.exp2(tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale - b_lse[:, None])
        if MASKED:
            b_p = tl.where(in_range(start_n + tl.arange(0, BLOCK_N), b_lo, b_hi), b_p, 0.0)
        b_v = load_tile(p_v, i_b, i_hk, start_n, SEQ_K, stride_vs, stride_vd, o_d, m_d, BLOCK_N, BLOCK_D, MASKED,
                        USE_TMA, INT64)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
        b_ds = (b_p * (b_dp - b_delta[:, None])).to(b_k.dtype)
        b_dq = tl.dot(b_ds, b_k, b_dq, input_precision=DOT_PRECISION)
    return b_dq


@triton.jit(do_not_specialize=["SEQ_Q", "SEQ_K", "GROUP", "N_HQ", "stride_rb"])
def attention_bwd_dq_kernel(
    p_q, p_k, p_v, p_do, p_ld, p_dq, p_lo, p_hi,
    # runtime scalars
    qk_scale, grad_scale, SEQ_Q, SEQ_K, HEAD_DIM, GROUP, N_HQ,
    # strides (batch, head, seq, dim) of q_rot, k_rot, v, do, dq; batch of the query ranges
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd, stride_rb,
    # meta-parameters
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid: (cdiv(Sq, BLOCK_M), batch, q_heads). p_k, p_v: pointers, or TensorDescriptors when USE_TMA;
    p_ld: the (lse, delta) pairs; p_lo, p_hi: int32 (batch, Sq) with batch stride stride_rb (0 when shared
    by all batch rows), the keys [lo, hi) each query row sees.
    dQ in the rotated space, times grad_scale."""
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (last, causal) Q tiles first, as the forward
    i_b, i_h = widen(tl.program_id(1), INT64), widen(tl.program_id(2), INT64)
    i_hk = i_h // GROUP
    r_off = i_b * stride_rb  # the batch row's query ranges (kernels/attention_tiles.batch_ranges)

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < SEQ_Q
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    bounds = tile_ranges(p_lo, p_hi, r_off + i_m * BLOCK_M, r_off + tl.minimum(i_m * BLOCK_M + BLOCK_M, SEQ_Q) - 1,
                         BLOCK_N)
    b_q = load_tile(p_q + i_b * stride_qb + i_h * stride_qh, i_b, i_h, i_m * BLOCK_M, SEQ_Q, stride_qs, stride_qd,
                    o_d, m_d, BLOCK_M, BLOCK_D, True, False, INT64)
    b_do = load_tile(p_do + i_b * stride_dob + i_h * stride_doh, i_b, i_h, i_m * BLOCK_M, SEQ_Q, stride_dos,
                     stride_dod, o_d, m_d, BLOCK_M, BLOCK_D, True, False, INT64)
    # Rows past the tensor read lse = 0, not +inf: their p is finite, their dq is never stored.
    ld_row = (i_b * N_HQ + i_h) * SEQ_Q  # the head's first row in p_ld
    b_lse, b_delta = load_lse_delta(p_ld, (ld_row + i_m * BLOCK_M) * 2 + tl.arange(0, 2 * BLOCK_M),
                                    (ld_row + SEQ_Q) * 2, BLOCK_M, True)
    p_kh = head_base(p_k, i_b, i_hk, stride_kb, stride_kh, USE_TMA)
    p_vh = head_base(p_v, i_b, i_hk, stride_vb, stride_vh, USE_TMA)

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in tl.static_range(3):  # masked, full, masked
        b_dq = _dq_loop(b_dq, b_q, b_do, b_lse, b_delta, p_kh, p_vh, i_b, i_hk, qk_scale, p_lo, p_hi, r_off, o_m, m_m,
                        bounds[i], bounds[i + 1], SEQ_K, stride_ks, stride_kd, stride_vs, stride_vd, o_d, m_d, i != 1,
                        BLOCK_N, BLOCK_D, DOT_PRECISION, USE_TMA, INT64)
    store_block(p_dq + i_b * stride_dqb + i_h * stride_dqh, b_dq * grad_scale, widen(o_m, INT64), m_m, stride_dqs,
                stride_dqd, o_d, m_d)

"""LongRoPE attention, forward: FlashAttention-2 over q and k rotated once per token.

Rotate once, attend many: the rotary kernel (kernels/rotary.py) rotates q and k in one
O(N d) pass before this kernel runs (k_rot is also what a KV cache stores, q_rot and k_rot
are what the backward reads), so this kernel is plain FlashAttention-2 over whole rows: one
dot over head_dim, loads that vectorize and pipeline, nothing rotary live beside the
accumulators. Rotating Q in this kernel's prologue instead was measured in the sm_90
compile (docs/kernels.md): the gathered table loads of a [BLOCK_M, head_dim] tile need
per-element addresses next to the Q tile and made every head_dim-128 tile spill.

Rounding convention shared with the backward: q_rot and k_rot are rounded to the input
dtype, their dot accumulates in fp32, and the fp32 scores are scaled by
softmax_scale * log2(e) after the dot (in full tiles fused with the max subtraction into
one FMA). Causal masks, packed sequences and a static cache's key counts are per-row key
ranges (kernels/attention_tiles.py): full tiles test nothing. Naming legend in kernels/rotary.py.
"""

import triton
import triton.language as tl

from .attention_tiles import batch_ranges, head_base, in_range, load_tile, row_ranges, tile_ranges
from .rotary import store_block, widen


@triton.jit
def online_softmax_step(b_acc, b_l, b_m, b_s, b_v, DOT_PRECISION: tl.constexpr):
    """Fold one tile of masked, scaled base-2 scores b_s and its values b_v into the running
    (accumulator, row sum, row max) of the online softmax."""
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    # Rows with no visible key yet keep m = -inf; shift by 0 there so exp2 gives 0, not NaN.
    b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    b_p = tl.math.exp2(b_s - b_shift[:, None])
    b_alpha = tl.math.exp2(b_m - b_shift)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    return b_acc, b_l, b_m_new


@triton.jit
def full_tile_softmax_step(b_acc, b_l, b_m, b_s, qk_scale, b_v, DOT_PRECISION: tl.constexpr):
    """online_softmax_step for a tile every row sees in full, on unscaled scores: the row max is
    taken before scaling (qk_scale >= 0, so max(s) * c = max(s * c) exactly) and the scale and the
    subtraction are one FMA; every row's max is finite after the tile, so no guard."""
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1) * qk_scale)
    b_p = tl.math.exp2(b_s * qk_scale - b_m_new[:, None])
    b_alpha = tl.math.exp2(b_m - b_m_new)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None], input_precision=DOT_PRECISION)
    return b_acc, b_l, b_m_new


@triton.jit
def normalized_output(b_acc, b_l, b_m, EMPTY_LSE: tl.constexpr):
    """(out, base-2 LSE) of the online softmax; rows that saw no key: out 0, LSE EMPTY_LSE."""
    b_empty = b_l == 0.0
    b_out = b_acc / tl.where(b_empty, 1.0, b_l)[:, None]
    return b_out, tl.where(b_empty, EMPTY_LSE, b_m + tl.math.log2(tl.where(b_empty, 1.0, b_l)))


@triton.jit
def _fwd_loop(b_acc, b_l, b_m, b_q, p_k, p_v, i_b, i_hk, qk_scale, p_lo, p_hi, o_m, m_m, n_lo, n_hi, SEQ_K,
              stride_ks, stride_kd, stride_vs, stride_vd, o_d, m_d,
              MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
              USE_TMA: tl.constexpr, INT64: tl.constexpr):
    """Online softmax (base 2) over the key tiles [n_lo, n_hi); MASKED tiles test each row's key range."""
    if MASKED:
        b_lo, b_hi = row_ranges(p_lo, p_hi, o_m, m_m)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        b_k = load_tile(p_k, i_b, i_hk, start_n, SEQ_K, stride_ks, stride_kd, o_d, m_d, BLOCK_N, BLOCK_D, MASKED,
                        USE_TMA, INT64)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
        b_v = load_tile(p_v, i_b, i_hk, start_n, SEQ_K, stride_vs, stride_vd, o_d, m_d, BLOCK_N, BLOCK_D, MASKED,
                        USE_TMA, INT64)
        if MASKED:
            b_s = tl.where(in_range(start_n + tl.arange(0, BLOCK_N), b_lo, b_hi), b_s * qk_scale, float("-inf"))
            b_acc, b_l, b_m = online_softmax_step(b_acc, b_l, b_m, b_s, b_v, DOT_PRECISION)
        else:
            b_acc, b_l, b_m = full_tile_softmax_step(b_acc, b_l, b_m, b_s, qk_scale, b_v, DOT_PRECISION)
    return b_acc, b_l, b_m


# Lengths, the GQA group and the LSE strides (multiples of the length) are not specialized: a new
# sequence length must not compile a new kernel (tests/test_compile_budget.py).
@triton.jit(do_not_specialize=["SEQ_Q", "SEQ_K", "GROUP", "stride_lb", "stride_lh", "stride_rb"])
def attention_fwd_kernel(
    p_q, p_k, p_v, p_out, p_lse, p_lo, p_hi,
    # runtime scalars
    qk_scale, SEQ_Q, SEQ_K, HEAD_DIM, GROUP,
    # strides (batch, head, seq, dim) of q, k, v, out; (batch, head, seq) of lse; batch of the row ranges
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls, stride_rb,
    # meta-parameters
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid: (cdiv(Sq, BLOCK_M), batch, q_heads). p_k, p_v: pointers, or TensorDescriptors when USE_TMA.
    p_lo, p_hi: int32 (batch, Sq) with batch stride stride_rb (0 when every batch row shares them), the
    keys [lo, hi) each query row sees. qk_scale >= 0. Writes out and the base-2 LSE of the scaled scores
    (+inf for rows that see no key)."""
    # Last Q tiles first: under a causal mask they see the most keys, so the heaviest programs start
    # first and the light ones fill the tail of the launch.
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_b, i_h = widen(tl.program_id(1), INT64), widen(tl.program_id(2), INT64)
    i_hk = i_h // GROUP
    p_lo, p_hi = batch_ranges(p_lo, p_hi, i_b, stride_rb)

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < SEQ_Q
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    bounds = tile_ranges(p_lo, p_hi, i_m * BLOCK_M, tl.minimum(i_m * BLOCK_M + BLOCK_M, SEQ_Q) - 1, BLOCK_N)
    b_q = load_tile(p_q + i_b * stride_qb + i_h * stride_qh, i_b, i_h, i_m * BLOCK_M, SEQ_Q, stride_qs, stride_qd,
                    o_d, m_d, BLOCK_M, BLOCK_D, True, False, INT64)
    p_kh = head_base(p_k, i_b, i_hk, stride_kb, stride_kh, USE_TMA)
    p_vh = head_base(p_v, i_b, i_hk, stride_vb, stride_vh, USE_TMA)

    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for i in tl.static_range(3):  # masked, full, masked
        b_acc, b_l, b_m = _fwd_loop(b_acc, b_l, b_m, b_q, p_kh, p_vh, i_b, i_hk, qk_scale, p_lo, p_hi, o_m, m_m,
                                    bounds[i], bounds[i + 1], SEQ_K, stride_ks, stride_kd, stride_vs, stride_vd, o_d,
                                    m_d, i != 1, BLOCK_N, BLOCK_D, DOT_PRECISION, USE_TMA, INT64)
    # Rows that see no key output 0 and get LSE +inf so the backward's p is 0.
    b_out, b_lse = normalized_output(b_acc, b_l, b_m, float("inf"))
    store_block(p_out + i_b * stride_ob + i_h * stride_oh, b_out, widen(o_m, INT64), m_m, stride_os, stride_od, o_d,
                m_d)
    tl.store(p_lse + i_b * stride_lb + i_h * stride_lh + o_m * stride_ls, b_lse, mask=m_m)

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
softmax_scale * log2(e) after the dot. Naming legend in kernels/rotary.py.
"""

import triton
import triton.language as tl

from .rotary import load_block, store_block, widen

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
def score_mask(o_m, o_n, len_q, len_k, CAUSAL: tl.constexpr):
    """Valid (row, col) pairs: inside both sequences and, if CAUSAL, col <= row + len_k - len_q."""
    m = (o_m[:, None] < len_q) & (o_n[None, :] < len_k)
    if CAUSAL:
        m = m & (o_n[None, :] <= o_m[:, None] + (len_k - len_q))
    return m


@triton.jit
def online_softmax_step(b_acc, b_l, b_m, b_s, b_v, DOT_PRECISION: tl.constexpr):
    """Fold one tile of masked base-2 scores b_s and its values b_v into the running
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
def normalized_output(b_acc, b_l, b_m, EMPTY_LSE: tl.constexpr):
    """(out, base-2 LSE) of the online softmax; rows that saw no key: out 0, LSE EMPTY_LSE."""
    b_empty = b_l == 0.0
    b_out = b_acc / tl.where(b_empty, 1.0, b_l)[:, None]
    return b_out, tl.where(b_empty, EMPTY_LSE, b_m + tl.math.log2(tl.where(b_empty, 1.0, b_l)))


@triton.jit
def _fwd_inner(b_acc, b_l, b_m, b_q, p_k, p_v, qk_scale, o_m, len_q, len_k, n_lo, n_hi,
               stride_ks, stride_kd, stride_vs, stride_vd, o_d, m_d,
               MASK_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64: tl.constexpr):
    """Online softmax (base 2) over K tiles [n_lo, n_hi); causal masking only where MASK_CAUSAL."""
    for start_n in range(n_lo, n_hi, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < len_k
        o_nw = widen(o_n, INT64)  # row offsets; masks use o_n
        b_k = load_block(p_k, o_nw, m_n, stride_ks, stride_kd, o_d, m_d)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale
        b_s = tl.where(score_mask(o_m, o_n, len_q, len_k, MASK_CAUSAL), b_s, float("-inf"))
        b_v = load_block(p_v, o_nw, m_n, stride_vs, stride_vd, o_d, m_d)
        b_acc, b_l, b_m = online_softmax_step(b_acc, b_l, b_m, b_s, b_v, DOT_PRECISION)
    return b_acc, b_l, b_m


# Lengths, the GQA group and the LSE strides (multiples of the length) are not specialized: a new
# sequence length must not compile a new kernel (tests/test_compile_budget.py).
@triton.jit(do_not_specialize=["SEQ_Q", "SEQ_K", "GROUP", "stride_lb", "stride_lh"])
def attention_fwd_kernel(
    p_q, p_k, p_v, p_out, p_lse, p_cu_q, p_cu_k,
    # runtime scalars
    qk_scale, SEQ_Q, SEQ_K, HEAD_DIM, GROUP,
    # strides (batch, head, seq, dim) of q, k, v, out; (batch, head, seq) of lse
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    # meta-parameters
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid: (cdiv(max Sq, BLOCK_M), batch or n_seqs, q_heads). Writes out and the base-2 LSE of the
    scaled scores (+inf for rows that see no key)."""
    # Last Q tiles first: under a causal mask they see the most keys, so the heaviest programs start
    # first and the light ones fill the tail of the launch.
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_b, i_h = tl.program_id(1), widen(tl.program_id(2), INT64)
    q_start, len_q, k_start, len_k = sequence_bounds(p_cu_q, p_cu_k, i_b, SEQ_Q, SEQ_K, IS_VARLEN, INT64)
    start_m = i_m * BLOCK_M
    if start_m >= len_q:
        return
    i_bt = 0 if IS_VARLEN else widen(i_b, INT64)  # batch index of the tensors (packed sequences: batch 0)
    i_hk = i_h // GROUP

    o_m = start_m + tl.arange(0, BLOCK_M)
    m_m = o_m < len_q
    o_mw = widen(o_m, INT64)  # row offsets; masks use o_m
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    p_k += i_bt * stride_kb + i_hk * stride_kh + k_start * stride_ks
    p_v += i_bt * stride_vb + i_hk * stride_vh + k_start * stride_vs
    b_q = load_block(p_q + i_bt * stride_qb + i_h * stride_qh + q_start * stride_qs, o_mw, m_m, stride_qs, stride_qd,
                     o_d, m_d)

    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    n_full, n_end = key_tile_range(start_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    b_acc, b_l, b_m = _fwd_inner(b_acc, b_l, b_m, b_q, p_k, p_v, qk_scale, o_m, len_q, len_k, 0, n_full,
                                 stride_ks, stride_kd, stride_vs, stride_vd, o_d, m_d, False, BLOCK_N,
                                 DOT_PRECISION, INT64)
    b_acc, b_l, b_m = _fwd_inner(b_acc, b_l, b_m, b_q, p_k, p_v, qk_scale, o_m, len_q, len_k, n_full, n_end,
                                 stride_ks, stride_kd, stride_vs, stride_vd, o_d, m_d, CAUSAL, BLOCK_N,
                                 DOT_PRECISION, INT64)
    # Rows that see no key (Sq > Sk, causal) output 0 and get LSE +inf so the backward's p is 0.
    b_out, b_lse = normalized_output(b_acc, b_l, b_m, float("inf"))
    store_block(p_out + i_bt * stride_ob + i_h * stride_oh + q_start * stride_os, b_out, o_mw, m_m, stride_os,
                stride_od, o_d, m_d)
    tl.store(p_lse + i_bt * stride_lb + i_h * stride_lh + (q_start + o_m) * stride_ls, b_lse, mask=m_m)

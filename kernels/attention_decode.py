"""LongRoPE attention for a few query tokens against a long rotated-K cache: split-KV decoding.

A decode step has 1-16 query rows per head and up to 128K cached keys. The prefill kernel
would give each query head a BLOCK_M-row tile (mostly padding) and walk the whole cache in
one program per head. Here (flash-decoding):

- the query rows of one GQA group share one program, packed into the tile's rows
  (row r = g * Sq + i: head g of the group, query i), so each K/V tile is read once per
  kv head, not once per query head;
- the cache is split along the sequence over programs, each writing a partial output and
  its log-sum-exp (base 2, of the scaled scores; -inf where a split sees no key);
- a second small kernel merges the partials exactly with their log-sum-exps.

q arrives rotated (the rotary kernel, like every path) and the cache holds rotated keys;
the rounding convention is the prefill kernels' (fp32 dot of rounded operands, scaled after),
and the merged LSE is the forward's, so the usual backward kernels apply. Naming legend in
kernels/rotary.py.
"""

import triton
import triton.language as tl

from .attention_fwd import normalized_output, online_softmax_step
from .rotary import load_block, widen


@triton.jit(do_not_specialize=["SEQ_Q", "SEQ_K", "GROUP", "split_len", "N_CHUNKS", "stride_lb", "stride_lh",
                               "stride_ls", "stride_lsp"])
def attention_decode_split_kernel(
    p_q, p_k, p_v, p_o_part, p_lse_part, p_used,
    # runtime scalars
    qk_scale, SEQ_Q, SEQ_K, HEAD_DIM, GROUP, split_len, N_CHUNKS,
    # strides (batch, head, seq, dim) of q, k, v; (batch, head, seq, split, dim) / (..., split) of the partials
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_osp, stride_od,
    stride_lb, stride_lh, stride_ls, stride_lsp,
    # meta-parameters
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_USED: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64: tl.constexpr,
):
    """Grid: (n_splits, batch, kv_heads * N_CHUNKS). One split of the cache for BLOCK_R packed
    (query head, query) rows of one GQA group; causal is bottom-right aligned.

    HAS_USED: batch row b attends only its first p_used[b] keys (a static cache's filled part),
    read here on the device, so the grid (splits over the cache's capacity SEQ_K) and everything
    the host computes stay the same from step to step: a CUDA graph replays it. Splits past
    the end run no iteration and merge with weight 0."""
    i_sp, i_b, i_x = tl.program_id(0), widen(tl.program_id(1), INT64), tl.program_id(2)
    i_hk, i_c = i_x // N_CHUNKS, i_x % N_CHUNKS
    o_r = i_c * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < GROUP * SEQ_Q
    o_h = widen(i_hk * GROUP + o_r // SEQ_Q, INT64)  # query head of each row
    o_i = o_r % SEQ_Q  # query index of each row
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    b_q = tl.load(p_q + i_b * stride_qb + o_h[:, None] * stride_qh + widen(o_i, INT64)[:, None] * stride_qs
                  + o_d[None, :] * stride_qd, mask=m_r[:, None] & m_d[None, :], other=0.0)
    p_k += i_b * stride_kb + widen(i_hk, INT64) * stride_kh
    p_v += i_b * stride_vb + widen(i_hk, INT64) * stride_vh

    if HAS_USED:
        seq_k = tl.load(p_used + i_b)
    else:
        seq_k = SEQ_K
    n_lo = i_sp * split_len
    n_hi = tl.minimum(n_lo + split_len, seq_k)
    b_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    b_l = tl.zeros([BLOCK_R], dtype=tl.float32)
    b_m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < n_hi
        o_nw = widen(o_n, INT64)
        b_k = load_block(p_k, o_nw, m_n, stride_ks, stride_kd, o_d, m_d)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale
        m_s = m_r[:, None] & m_n[None, :]
        if CAUSAL:
            m_s = m_s & (o_n[None, :] <= o_i[:, None] + (seq_k - SEQ_Q))
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_v = load_block(p_v, o_nw, m_n, stride_vs, stride_vd, o_d, m_d)
        b_acc, b_l, b_m = online_softmax_step(b_acc, b_l, b_m, b_s, b_v, DOT_PRECISION)
    # A split whose keys no row sees gets LSE -inf: weight 0 in the merge.
    b_o, b_lse = normalized_output(b_acc, b_l, b_m, float("-inf"))
    row_o = i_b * stride_ob + o_h * stride_oh + widen(o_i, INT64) * stride_os + i_sp * stride_osp
    tl.store(p_o_part + row_o[:, None] + o_d[None, :] * stride_od, b_o, mask=m_r[:, None] & m_d[None, :])
    tl.store(p_lse_part + i_b * stride_lb + o_h * stride_lh + widen(o_i, INT64) * stride_ls + i_sp * stride_lsp,
             b_lse, mask=m_r)


@triton.jit(do_not_specialize=["N_SPLITS", "stride_lb", "stride_lh", "stride_ls", "stride_lsp", "stride_fb", "stride_fh",
                               "stride_fs"])
def attention_decode_merge_kernel(
    p_o_part, p_lse_part, p_out, p_lse,
    # runtime scalars
    N_SPLITS, HEAD_DIM,
    # strides of the partials (batch, head, seq, split, dim) / (..., split); out (batch, head, seq, dim); lse
    stride_ob, stride_oh, stride_os, stride_osp, stride_od,
    stride_lb, stride_lh, stride_ls, stride_lsp,
    stride_outb, stride_outh, stride_outs, stride_outd,
    stride_fb, stride_fh, stride_fs,
    # meta-parameters
    BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr, INT64: tl.constexpr,
):
    """Grid: (Sq, batch, q_heads). out = sum_j w_j o_j / sum_j w_j with w_j = 2^(lse_j - max lse):
    exact, since each o_j is its split's softmax average. The merged LSE is the forward's
    (+inf for a row that sees no key, so the backward's p is 0 there)."""
    i_s, i_b, i_h = widen(tl.program_id(0), INT64), widen(tl.program_id(1), INT64), widen(tl.program_id(2), INT64)
    o_sp = tl.arange(0, BLOCK_SPLITS)
    m_sp = o_sp < N_SPLITS
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    b_lse = tl.load(p_lse_part + i_b * stride_lb + i_h * stride_lh + i_s * stride_ls + o_sp * stride_lsp, mask=m_sp,
                    other=float("-inf"))
    b_max = tl.max(b_lse, 0)
    b_w = tl.math.exp2(b_lse - tl.where(b_max == float("-inf"), 0.0, b_max))
    b_o = tl.load(p_o_part + i_b * stride_ob + i_h * stride_oh + i_s * stride_os + o_sp[:, None] * stride_osp
                  + o_d[None, :] * stride_od, mask=m_sp[:, None] & m_d[None, :], other=0.0)
    b_sum = tl.sum(b_w, 0)
    b_out = tl.sum(b_w[:, None] * b_o, 0) / tl.where(b_sum == 0.0, 1.0, b_sum)
    tl.store(p_out + i_b * stride_outb + i_h * stride_outh + i_s * stride_outs + o_d * stride_outd, b_out, mask=m_d)
    tl.store(p_lse + i_b * stride_fb + i_h * stride_fh + i_s * stride_fs,
             tl.where(b_sum == 0.0, float("inf"), b_max + tl.math.log2(tl.where(b_sum == 0.0, 1.0, b_sum))))

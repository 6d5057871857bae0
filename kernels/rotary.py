"""LongRoPE rotary kernel and the rotation helpers shared with the fused attention kernels.

Naming legend (kernels/): ``i_`` program ids, ``o_`` offsets, ``m_`` masks, ``p_``
pointers, ``b_`` register blocks; capitals are dims, block sizes and constexpr flags.

Angles never come from an O(seq x dim) cache: each position is split as
p = p_hi * 2^11 + p_lo and cos/sin come from two float64-built rows of a small
table combined by one complex multiply (see longrope_triton/tables.py for the layout
and the error analysis).
"""

import triton
import triton.language as tl

# p = p_hi * LO_ROWS + p_lo (must match longrope_triton/tables.py)
LO_BITS = tl.constexpr(11)
LO_MASK = tl.constexpr(2047)
LO_ROWS = tl.constexpr(2048)


@triton.jit
def rope_cos_sin(p_tab, tab_rows, b_pos, b_set, o_f, m_f, HALF: tl.constexpr):
    """mscale * cos(phi) and mscale * sin(phi) for a block of positions x frequencies.

    b_pos, b_set: [BLOCK] int32 positions and table sets; o_f, m_f: [BLOCK_HALF] frequency
    offsets and mask. Returns two fp32 [BLOCK, BLOCK_HALF] blocks (1 and 0 where masked).

    Positions are checked by the launcher's caller only in eager mode (under torch.compile or
    CUDA-graph capture they are device asserts, and the check can be switched off), so the
    table rows are made safe here: a negative position loads nothing (masked), one past the
    table reads its last p_hi row. A bad position gives a wrong angle, never a stray read.
    """
    set_base = b_set[:, None] * (2 * tab_rows * HALF)
    o_hi_row = tl.minimum(b_pos >> LO_BITS, tab_rows - LO_ROWS - 1)
    o_hi = set_base + o_hi_row[:, None] * HALF + o_f[None, :]
    o_lo = set_base + (tab_rows - LO_ROWS + (b_pos & LO_MASK))[:, None] * HALF + o_f[None, :]
    m = m_f[None, :] & (b_pos >= 0)[:, None]
    b_cos_hi = tl.load(p_tab + o_hi, mask=m, other=1.0)
    b_sin_hi = tl.load(p_tab + tab_rows * HALF + o_hi, mask=m, other=0.0)
    b_cos_lo = tl.load(p_tab + o_lo, mask=m, other=1.0)
    b_sin_lo = tl.load(p_tab + tab_rows * HALF + o_lo, mask=m, other=0.0)
    b_cos = b_cos_hi * b_cos_lo - b_sin_hi * b_sin_lo
    b_sin = b_sin_hi * b_cos_lo + b_cos_hi * b_sin_lo
    return b_cos, b_sin


@triton.jit
def table_set(b_pos, start_token, regime_set):
    """Table set per position: the unscaled set 0 below n_hat, else the regime's set (1 short, 2 long)."""
    return tl.where(b_pos < start_token, 0, regime_set)


@triton.jit
def rotate_pair(b_x1, b_x2, b_cos, b_sin, CONJUGATE: tl.constexpr):
    """(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); CONJUGATE rotates by -phi (the backward)."""
    if CONJUGATE:
        b_sin = -b_sin
    return b_x1 * b_cos - b_x2 * b_sin, b_x2 * b_cos + b_x1 * b_sin


@triton.jit
def pair_offsets(o_f, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Head-dim offsets of the two members of each rotated pair: (2i, 2i+1) or (i, i + r/2)."""
    if INTERLEAVED:
        return 2 * o_f, 2 * o_f + 1
    return o_f, o_f + HALF


@triton.jit
def widen(i, INT64: tl.constexpr):
    """An index in the offset type: int64 when some tensor of the launch passes 2^31 elements
    (the launcher decides, as Inductor does), else int32, which costs far fewer registers."""
    return tl.cast(i, tl.int64) if INT64 else i


@triton.jit
def load_pairs(p_x, o_s, m_s, stride_s, stride_d, o_f, m_f, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Load the two members of every rotated pair of a (BLOCK, head_dim) tile as fp32 blocks."""
    o_a, o_b = pair_offsets(o_f, HALF, INTERLEAVED)
    m = m_s[:, None] & m_f[None, :]
    p_rows = p_x + o_s[:, None] * stride_s
    b_x1 = tl.load(p_rows + o_a[None, :] * stride_d, mask=m, other=0.0).to(tl.float32)
    b_x2 = tl.load(p_rows + o_b[None, :] * stride_d, mask=m, other=0.0).to(tl.float32)
    return b_x1, b_x2


@triton.jit
def store_pairs(p_y, b_y1, b_y2, o_s, m_s, stride_s, stride_d, o_f, m_f, HALF: tl.constexpr,
                INTERLEAVED: tl.constexpr):
    """Store the two members of every rotated pair (the inverse of load_pairs)."""
    o_a, o_b = pair_offsets(o_f, HALF, INTERLEAVED)
    m = m_s[:, None] & m_f[None, :]
    p_rows = p_y + o_s[:, None] * stride_s
    tl.store(p_rows + o_a[None, :] * stride_d, b_y1, mask=m)
    tl.store(p_rows + o_b[None, :] * stride_d, b_y2, mask=m)


@triton.jit
def load_block(p_x, o_s, m_s, stride_s, stride_d, o_d, m_d):
    """A (BLOCK_S, BLOCK_D) tile at head-dim offsets o_d (pass-through dims, or V)."""
    return tl.load(p_x + o_s[:, None] * stride_s + o_d[None, :] * stride_d, mask=m_s[:, None] & m_d[None, :],
                   other=0.0)


@triton.jit
def store_block(p_y, b_y, o_s, m_s, stride_s, stride_d, o_d, m_d):
    tl.store(p_y + o_s[:, None] * stride_s + o_d[None, :] * stride_d, b_y, mask=m_s[:, None] & m_d[None, :])


@triton.jit
def positions_cos_sin(p_pos, o_s, m_s, stride_ps, p_tab, tab_rows, start_token, regime_set, o_f, m_f,
                      HALF: tl.constexpr):
    """cos/sin blocks for the positions of rows o_s (n_hat bypass included); regime_set: the
    [BLOCK] table sets of the rows."""
    b_pos = tl.load(p_pos + o_s * stride_ps, mask=m_s, other=0).to(tl.int32)
    return rope_cos_sin(p_tab, tab_rows, b_pos, table_set(b_pos, start_token, regime_set), o_f, m_f, HALF)


@triton.jit
def head_dim_offsets(HEAD_DIM, ROTARY_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
                     BLOCK_DV: tl.constexpr):
    """Offsets and masks along head_dim: rotated-pair frequencies, pass-through dims, whole rows (v, out)."""
    o_f = tl.arange(0, BLOCK_HALF)
    o_p = ROTARY_DIM + tl.arange(0, BLOCK_PASS if BLOCK_PASS > 0 else BLOCK_HALF)
    o_dv = tl.arange(0, BLOCK_DV)
    return o_f, o_f < ROTARY_DIM // 2, o_p, o_p < HEAD_DIM, o_dv, o_dv < HEAD_DIM


@triton.jit
def _rotate_heads(p_x, p_y, N_HEADS, b_cos, b_sin, o_s, m_s, o_f, m_f, o_p, m_p,
                  stride_xh, stride_xs, stride_xd, stride_yh, stride_ys, stride_yd,
                  HALF: tl.constexpr, HAS_PASS: tl.constexpr, INTERLEAVED: tl.constexpr,
                  CONJUGATE: tl.constexpr, INT64: tl.constexpr):
    """Rotate every head of one (batch, seq block): x -> y, pass-through dims copied."""
    for i_h in range(N_HEADS):
        p_xh = p_x + widen(i_h, INT64) * stride_xh
        p_yh = p_y + widen(i_h, INT64) * stride_yh
        b_x1, b_x2 = load_pairs(p_xh, o_s, m_s, stride_xs, stride_xd, o_f, m_f, HALF, INTERLEAVED)
        b_y1, b_y2 = rotate_pair(b_x1, b_x2, b_cos, b_sin, CONJUGATE)
        store_pairs(p_yh, b_y1, b_y2, o_s, m_s, stride_ys, stride_yd, o_f, m_f, HALF, INTERLEAVED)
        if HAS_PASS:
            b_xp = load_block(p_xh, o_s, m_s, stride_xs, stride_xd, o_p, m_p)
            store_block(p_yh, b_xp, o_s, m_s, stride_ys, stride_yd, o_p, m_p)


@triton.jit(do_not_specialize=["SEQ", "stride_pb", "stride_setb"])  # a new length compiles nothing new
def rotary_kernel(
    p_q, p_k, p_q_out, p_k_out, p_pos, p_set, p_tab,
    # runtime scalars
    tab_rows, start_token, SEQ, HEAD_DIM, N_HQ, N_HK,
    # strides (batch, head, seq, dim) of q, k, their outputs; (batch, seq) of positions and of table sets
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_qob, stride_qoh, stride_qos, stride_qod,
    stride_kob, stride_koh, stride_kos, stride_kod,
    stride_pb, stride_ps, stride_setb, stride_sets,
    # meta-parameters
    ROTARY_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, INT64: tl.constexpr,
):
    """Rotate q and k in one launch. Grid: (cdiv(SEQ, BLOCK_S), batch).

    cos/sin are computed once per (batch, seq block) and reused for all q and k heads,
    which is what keeps this memory-bound kernel at copy bandwidth. The table set (1 short,
    2 long) is read per row: one regime per batch row (stride 0 along seq), or per packed
    sequence. Outputs may differ from the inputs in dtype (the backward reads fp32 gradients)
    and may alias them (every element is read before it is written, by the same program).
    """
    i_s, i_b = tl.program_id(0), widen(tl.program_id(1), INT64)
    HALF: tl.constexpr = ROTARY_DIM // 2
    HAS_PASS: tl.constexpr = BLOCK_PASS > 0
    o_s = i_s * BLOCK_S + tl.arange(0, BLOCK_S)
    m_s = o_s < SEQ
    o_s = widen(o_s, INT64)  # row offsets (row x stride); the mask above stays int32
    o_f, m_f, o_p, m_p, _, _ = head_dim_offsets(HEAD_DIM, ROTARY_DIM, BLOCK_HALF, BLOCK_PASS, BLOCK_HALF)
    b_set = tl.load(p_set + i_b * stride_setb + o_s * stride_sets, mask=m_s, other=0)
    b_cos, b_sin = positions_cos_sin(p_pos + i_b * stride_pb, o_s, m_s, stride_ps, p_tab, tab_rows, start_token,
                                     b_set, o_f, m_f, HALF)
    _rotate_heads(p_q + i_b * stride_qb, p_q_out + i_b * stride_qob, N_HQ, b_cos, b_sin, o_s, m_s, o_f, m_f,
                  o_p, m_p, stride_qh, stride_qs, stride_qd, stride_qoh, stride_qos, stride_qod,
                  HALF, HAS_PASS, INTERLEAVED, CONJUGATE, INT64)
    _rotate_heads(p_k + i_b * stride_kb, p_k_out + i_b * stride_kob, N_HK, b_cos, b_sin, o_s, m_s, o_f, m_f,
                  o_p, m_p, stride_kh, stride_ks, stride_kd, stride_koh, stride_kos, stride_kod,
                  HALF, HAS_PASS, INTERLEAVED, CONJUGATE, INT64)

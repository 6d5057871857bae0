"""Tile bounds and tile loads shared by the attention forward and backward kernels.

The kernels know nothing about causal masks, packed sequences or static caches: every query
row carries the range [lo, hi) of keys it sees and every key the range of query rows that see
it, in the coordinates of the tensor's sequence axis (the launcher computes both on the device
from the causal flag, cu_seqlens and seqused_k, longrope_triton/attention.py: one array per
batch row when seqused_k gives each row its own key count, else one that all rows share, batch
stride 0). A tile's loop over the other axis then splits in three: [lo_min, lo_max) where some
rows start later (masked), [lo_max, hi_min) where every row sees every column (full tiles: no
mask of any kind, the loop that carries the work), [hi_min, hi_max) where some rows stop
earlier (masked: the causal diagonal band, the partial last tile, a packed sequence's end, a
static cache's last keys in use). Masked tiles are the only ones that test columns.

Loads come from a TensorDescriptor (TMA: no address arithmetic, rows past the tensor and dims
past head_dim read 0) or from pointers (any strides). Naming legend in kernels/rotary.py.
"""

import triton
import triton.language as tl

from .rotary import widen


@triton.jit
def batch_ranges(p_lo, p_hi, i_b, stride_rb):
    """The row ranges of batch row i_b: once per program, before any loop. stride_rb is 0 when every
    batch row shares the ranges (no static cache), so the same kernel serves both.

    The forward offsets its range pointers here; the backward kernels instead add the offset
    i_b * stride_rb to the row indices they pass to tile_ranges and row_ranges: offset pointers are
    two more 64-bit values held through the dK/dV loops, 8 B/thread more spill at head_dim 128 in
    the sm_90 compile, while the forward compiles best (no spill on pointer loads) with them."""
    return p_lo + i_b * stride_rb, p_hi + i_b * stride_rb


@triton.jit
def tile_ranges(p_lo, p_hi, first, last, BLOCK: tl.constexpr):
    """The loop split over the other axis for the rows first..last of a tile: (start, full_start,
    full_end, end). Tiles from start step BLOCK; [full_start, full_end) holds those every row sees in
    full. The ranges are non-decreasing along the rows (the launcher's contract), so the first and the
    last row bound them: scalar loads, no reduction over the tile."""
    start = tl.load(p_lo + first)
    full_start = start + tl.cdiv(tl.load(p_lo + last) - start, BLOCK) * BLOCK
    full_end = full_start + tl.maximum(tl.load(p_hi + first) - full_start, 0) // BLOCK * BLOCK
    return start, full_start, full_end, tl.load(p_hi + last)


@triton.jit
def row_ranges(p_lo, p_hi, o_r, m_r):
    """[lo, hi) of each row o_r; rows past the tensor (not m_r) get an empty range."""
    return tl.load(p_lo + o_r, mask=m_r, other=0), tl.load(p_hi + o_r, mask=m_r, other=0)


@triton.jit
def in_range(o_c, b_lo, b_hi):
    """[rows, cols] mask: column o_c inside its row's [lo, hi)."""
    return (o_c[None, :] >= b_lo[:, None]) & (o_c[None, :] < b_hi[:, None])


@triton.jit
def head_base(p_x, i_b, i_h, stride_b, stride_h, USE_TMA: tl.constexpr):
    """What load_tile reads one (batch, head) from: the descriptor itself, or a pointer to the head."""
    if USE_TMA:
        p_h = p_x
    else:
        p_h = p_x + i_b * stride_b + i_h * stride_h
    return p_h


@triton.jit
def load_tile(p_x, i_b, i_h, start, SEQ, stride_s, stride_d, o_d, m_d, BLOCK: tl.constexpr,
              BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr, USE_TMA: tl.constexpr, INT64: tl.constexpr):
    """Rows [start, start + BLOCK) of one (batch, head) as a [BLOCK, BLOCK_D] block, 0 past the
    tensor's SEQ rows and past head_dim. USE_TMA: p_x is a TensorDescriptor of the (batch, head, seq,
    dim) tensor (TMA clips at its bounds). Else p_x = head_base(...); rows are tested only with
    MASK_ROWS, since full tiles lie inside the tensor."""
    if USE_TMA:
        # TMA coordinates are int32 whatever the offset width (the descriptor holds 64-bit strides).
        b_x = p_x.load([tl.cast(i_b, tl.int32), tl.cast(i_h, tl.int32), tl.cast(start, tl.int32), 0])
        b_x = b_x.reshape(BLOCK, BLOCK_D)
    else:
        o_s = start + tl.arange(0, BLOCK)
        m = m_d[None, :]
        if MASK_ROWS:
            m = m & (o_s < SEQ)[:, None]
        b_x = tl.load(p_x + widen(o_s, INT64)[:, None] * stride_s + o_d[None, :] * stride_d, mask=m, other=0.0)
    return b_x

"""Split-KV decoding: the forward that fused_rope_attention uses for a few query tokens.

Launchers for kernels/attention_decode.py. ``fused_rope_attention`` takes this path by itself
when Sq <= DECODE_MAX_QUERIES (a decode step, or a short speculative / chunked step) and the
sequences are not packed; its output and LSE are those of the prefill forward, so the same
backward runs after it.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from . import _dispatch
from .kernels.attention_decode import attention_decode_merge_kernel, attention_decode_split_kernel

DECODE_MAX_QUERIES = 16
_MAX_ROWS = 64  # packed (query head, query) rows per program; larger GQA groups take several programs
_MAX_SPLITS = 128
_CPU_PROGRAMS = 16  # the interpreter has no SMs: a split count that still exercises the merge


def _programs_wanted(device: torch.device) -> int:
    """Enough programs to fill the device twice over (two per SM)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return _CPU_PROGRAMS


def key_tile(row_bytes: int) -> tuple[int, int]:
    """(keys per tile, pipeline stages): the K and V tiles of all stages stay well inside the
    shared memory of an H100 block for every head_dim and dtype (scripts/compile_check.py)."""
    return (64, 3) if row_bytes <= 256 else (32, 2)


def split_plan(programs_per_split: int, seq_k: int, device: torch.device, block_n: int,
               num_splits: Optional[int] = None) -> tuple[int, int]:
    """(number of splits, keys per split): as many splits as it takes to give every SM work,
    never a split shorter than one key tile; ``num_splits`` overrides (tests, benchmarks)."""
    tiles = triton.cdiv(max(seq_k, 1), block_n)
    if num_splits is None:
        num_splits = triton.cdiv(_programs_wanted(device), max(programs_per_split, 1))
    num_splits = max(1, min(num_splits, tiles, _MAX_SPLITS))
    split_len = triton.cdiv(tiles, num_splits) * block_n
    return triton.cdiv(max(seq_k, 1), split_len), split_len


def decode_forward(q_rot: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float,
                   num_splits: Optional[int] = None, seqused_k: Optional[torch.Tensor] = None):
    """Attention of a few rotated queries over a rotated cache, split along the cache.

    Args:
        q_rot: (batch, q_heads, Sq, head_dim), Sq <= DECODE_MAX_QUERIES, already rotated.
        k_rot, v: (batch, kv_heads, Sk, head_dim), the rotated cache; q_heads % kv_heads == 0.
        causal: bottom-right aligned (query i sees keys j <= i + Sk - Sq).
        num_splits: override the split count chosen from the cache length and the SM count.
        seqused_k: int32 (batch,): row b attends only its first seqused_k[b] keys, with causal
            alignment bottom-right against them (a static cache: Sk is its capacity). Read by the
            kernel on the device: the launch (grid, splits, arguments) depends on shapes alone.

    Returns:
        (out in q's layout and dtype, lse float32 (batch, q_heads, Sq), base 2 of the scaled scores).
    """
    batch, n_hq, sq, head_dim = q_rot.shape
    n_hk, sk = k_rot.shape[1], k_rot.shape[2]
    group = n_hq // n_hk
    block_r = max(16, min(_MAX_ROWS, triton.next_power_of_2(group * sq)))
    n_chunks = triton.cdiv(group * sq, block_r)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n, stages = key_tile(block_d * q_rot.element_size())
    n_splits, split_len = split_plan(batch * n_hk * n_chunks, sk, q_rot.device, block_n, num_splits)
    o_part = torch.empty((batch, n_hq, sq, n_splits, head_dim), dtype=torch.float32, device=q_rot.device)
    lse_part = torch.empty((batch, n_hq, sq, n_splits), dtype=torch.float32, device=q_rot.device)
    _dispatch.launch(
        "attention decode", attention_decode_split_kernel, (n_splits, batch, n_hk * n_chunks),
        (q_rot, k_rot, v, o_part, lse_part, lse_part if seqused_k is None else seqused_k,
         softmax_scale * 1.4426950408889634, sq, sk, head_dim, group, split_len, n_chunks,
         *q_rot.stride(), *k_rot.stride(), *v.stride(), *o_part.stride(), *lse_part.stride()),
        dict(BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d, CAUSAL=causal, HAS_USED=seqused_k is not None,
             DOT_PRECISION="ieee" if q_rot.dtype == torch.float32 else "tf32", num_warps=4, num_stages=stages))
    out = torch.empty_like(q_rot)
    lse = torch.empty((batch, n_hq, sq), dtype=torch.float32, device=q_rot.device)
    _dispatch.launch(
        "attention decode merge", attention_decode_merge_kernel, (sq, batch, n_hq),
        (o_part, lse_part, out, lse, n_splits, head_dim, *o_part.stride(), *lse_part.stride(), *out.stride(),
         *lse.stride()),
        dict(BLOCK_SPLITS=max(2, triton.next_power_of_2(n_splits)), BLOCK_D=block_d, num_warps=4))
    return out, lse

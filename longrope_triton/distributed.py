"""Context parallelism: LongRoPE attention over a sequence split across the ranks of a process group.

Layout (zigzag). A full sequence of length S is cut into 2W equal chunks of C = S / (2W) tokens
(W = world size); rank r keeps chunks r and 2W-1-r, concatenated, so every rank holds S / W
tokens and, under a causal mask, the same amount of attention work (an early chunk pairs with a
late one)::

    W = 2, S = 8 (C = 2)     positions  0 1 | 2 3 | 4 5 | 6 7
                             chunk        0  |  1  |  2  |  3
                             rank 0 keeps chunks 0, 3 -> positions 0 1 6 7
                             rank 1 keeps chunks 1, 2 -> positions 2 3 4 5

Algorithm (all-gather of rotated K/V, as Llama 3 trains at long context). Each rank rotates its
local keys once with their *global* positions and the regime of the *whole* sequence, all-gathers
the rotated keys and the values, and runs ``fused_rope_attention`` for each of its two query
chunks against the keys it may see (a causal prefix, or all of them). The result is exact: no
log-sum-exp merging, one softmax per query row as on one device. In backward, autograd gives
exact dq locally; the full-K/V gradients are summed over the ranks and each rank keeps its own
shard (reduce-scatter), then rotated back (apply_rotary's backward).

Gradient convention of shard_sequence / gather_sequence: a full-length tensor is *replicated* —
every rank holds the same values and, after backward, the same complete gradient. So
``gather_sequence(context_parallel_attention(shard_sequence(q), ...))`` behaves, forward and
backward, exactly like ``fused_rope_attention(q, ...)`` on every rank. docs/distributed.md has the
launch command, the cost model and how this meets data-parallel gradient averaging.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ._validation import (FLOAT_DTYPES, check_config, check_gqa, check_heads, check_same,
                          check_seq_len)
from .attention import fused_rope_attention
from .config import LongRoPEConfig
from .rotary import apply_rotary

# Dtypes named in the cross-rank consistency check (other dtypes are compared by element size).
_NAMED_DTYPES = FLOAT_DTYPES + (torch.int32, torch.int64, torch.bool)


# ---------------------------------------------------------------------------- process group
def _rank_and_world(group) -> tuple[int, int]:
    """(rank within ``group``, group size); clear errors when there is no usable process group."""
    if not dist.is_available():
        raise RuntimeError("longrope_triton.distributed needs a PyTorch built with torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError("no process group: call torch.distributed.init_process_group() first "
                           "(torchrun sets up the environment it reads)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


def _backend_has_reduce_scatter(t: torch.Tensor, group) -> bool:
    """NCCL reduce-scatters CUDA tensors. gloo (the CPU backend) lacks reduce-scatter in older
    PyTorch releases, so every other backend takes all-reduce + slicing (twice the bytes)."""
    return t.is_cuda and "nccl" in str(dist.get_backend(group))


# ---------------------------------------------------------------------------- zigzag layout
def _seq_dim(x: torch.Tensor, dim: int) -> int:
    """``dim`` as a non-negative index of x's dimensions."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for a tensor with {x.dim()} dimensions")
    return dim % x.dim()


def _check_divisible(full_len: int, world: int) -> None:
    if full_len % (2 * world):
        raise ValueError(f"context parallelism needs the full sequence length S divisible by 2*W: "
                         f"S = {full_len}, W = {world} (world size), 2*W = {2 * world}")


def _zigzag_shard(full: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """Chunks ``rank`` and ``2*world-1-rank`` of 2*world equal chunks along ``dim``, concatenated."""
    chunks = full.chunk(2 * world, dim)
    return torch.cat((chunks[rank], chunks[2 * world - 1 - rank]), dim)


def _zigzag_unshard(shards: list, dim: int) -> torch.Tensor:
    """The full tensor from every rank's zigzag shard (``shards[r]`` from rank r), in global order."""
    halves = [s.chunk(2, dim) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


# ---------------------------------------------------------------------------- collectives (no autograd)
def _all_gather_zigzag(shard: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Every rank's zigzag shard along ``dim``, reassembled in global order (same on every rank)."""
    shard = shard.contiguous()  # collectives move flat buffers
    shards = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, shard, group=group)
    return _zigzag_unshard(shards, dim)


def _reduce_scatter_zigzag(full: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's zigzag shard of the sum over ranks of ``full`` (each rank's own partial value)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if _backend_has_reduce_scatter(full, group):
        per_rank = [_zigzag_shard(full, dim, r, world).contiguous() for r in range(world)]
        out = torch.empty_like(per_rank[rank])
        dist.reduce_scatter(out, per_rank, group=group)
        return out
    summed = full.clone(memory_format=torch.contiguous_format)  # all_reduce is in place: not autograd's buffer
    dist.all_reduce(summed, group=group)
    return _zigzag_shard(summed, dim, rank, world)


def _dtype_code(dtype: torch.dtype) -> int:
    return _NAMED_DTYPES.index(dtype) if dtype in _NAMED_DTYPES else -dtype.itemsize


def _dtype_name(code: int) -> str:
    return str(_NAMED_DTYPES[code]).replace("torch.", "") if code >= 0 else f"a {-code}-byte dtype"


def _check_same_on_all_ranks(what: str, fields: list, group, device) -> None:
    """All-gather a few integers per rank — ``fields`` is [(label, tuple of ints)], "dtype"
    holding a dtype code — and raise the same ValueError on every rank when any rank differs.

    Without it, shards of different sizes would make the K/V all-gather hang (NCCL) or fail
    deep inside the backend (gloo). Costs one tiny all-gather and one host sync per call.
    """
    flat = [int(n) for _, values in fields for n in values]
    mine = torch.tensor(flat, dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    rows = [t.tolist() for t in table]
    if all(row == rows[0] for row in rows):
        return

    def describe(row):
        parts, i = [], 0
        for label, values in fields:
            chunk, i = row[i:i + len(values)], i + len(values)
            parts.append(f"dtype {_dtype_name(chunk[0])}" if label == "dtype" else f"{label} {tuple(chunk)}")
        return ", ".join(parts)

    per_rank = "; ".join(f"rank {r}: {describe(row)}" for r, row in enumerate(rows))
    raise ValueError(f"{what}: the ranks' local shards disagree ({per_rank}); every rank must pass "
                     f"its zigzag shard of the same full tensors")


# ---------------------------------------------------------------------------- autograd
class _ShardSequence(torch.autograd.Function):
    """Replicated full tensor -> this rank's zigzag shard. Backward all-gathers the shards'
    gradients, so the full tensor's gradient is complete (and the same) on every rank."""

    @staticmethod
    def forward(ctx, full, dim, group, rank, world):
        ctx.dim, ctx.group = dim, group
        return _zigzag_shard(full, dim, rank, world)

    @staticmethod
    def backward(ctx, grad_shard):
        return _all_gather_zigzag(grad_shard, ctx.dim, ctx.group), None, None, None, None


class _GatherSequence(torch.autograd.Function):
    """Zigzag shards -> the full tensor in global order on every rank.

    Backward, ``sum_grads=False`` (gather_sequence): the full tensor is replicated, every rank
    holds the same complete gradient, and each keeps its own shard of it (no communication).
    ``sum_grads=True`` (K/V inside context_parallel_attention): each rank's queries produced a
    *partial* gradient of the full K/V; the shard's gradient is the sum over ranks.
    """

    @staticmethod
    def forward(ctx, shard, dim, group, sum_grads):
        ctx.dim, ctx.group, ctx.sum_grads = dim, group, sum_grads
        ctx.rank, ctx.world = dist.get_rank(group), dist.get_world_size(group)
        return _all_gather_zigzag(shard, dim, group)

    @staticmethod
    def backward(ctx, grad_full):
        if ctx.sum_grads:
            grad = _reduce_scatter_zigzag(grad_full, ctx.dim, ctx.group)
        else:
            grad = _zigzag_shard(grad_full, ctx.dim, ctx.rank, ctx.world)
        return grad, None, None, None


# ---------------------------------------------------------------------------- public functions
def zigzag_positions(full_len: int, group=None, device=None) -> torch.Tensor:
    """Global positions of this rank's zigzag shard of a sequence of ``full_len`` tokens.

    Args:
        full_len: S, the full sequence length; divisible by 2 * world size.
        group: the process group (None: the default group).
        device: where the positions are created (default CPU).

    Returns:
        int64 (S / W,): ``cat(arange(r*C, (r+1)*C), arange((2W-1-r)*C, (2W-r)*C))`` for rank r,
        C = S / (2W) — the position ids of the tokens ``shard_sequence`` leaves on this rank
        (what a model's rotary embedding or a loss mask needs).

    Example (2 ranks, under torchrun):
        >>> zigzag_positions(8)   # rank 0: tensor([0, 1, 6, 7]); rank 1: tensor([2, 3, 4, 5])
    """
    if isinstance(full_len, bool) or not isinstance(full_len, int):
        raise TypeError(f"full_len must be an int, got {type(full_len).__name__}")
    if full_len < 1:
        raise ValueError(f"full_len must be >= 1, got {full_len}")
    rank, world = _rank_and_world(group)
    _check_divisible(full_len, world)
    return _zigzag_shard(torch.arange(full_len, device=device), 0, rank, world)


def shard_sequence(x: torch.Tensor, dim: int = 2, group=None) -> torch.Tensor:
    """This rank's zigzag shard of a full tensor that every rank holds (the same on all ranks).

    Args:
        x: any tensor; its size S along ``dim`` must be divisible by 2 * world size.
            (batch, heads, seq, head_dim) attention inputs use the default dim=2; token ids or
            labels (batch, seq) use dim=1.
        dim: the sequence dimension.
        group: the process group (None: the default group).

    Returns:
        A new tensor with S / W along ``dim``: chunks r and 2W-1-r of 2W equal chunks. Differentiable:
        backward all-gathers the shards' gradients, so ``x.grad`` is the complete gradient of
        the sum of all ranks' losses, the same on every rank (docs/distributed.md, "Gradients").

    Example (under torchrun):
        >>> q = torch.randn(1, 8, 4096, 64)           # the same seeded tensor on every rank
        >>> q_local = shard_sequence(q)                # (1, 8, 4096 // W, 64)
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dim = _seq_dim(x, dim)
    rank, world = _rank_and_world(group)
    _check_divisible(x.shape[dim], world)
    return _ShardSequence.apply(x, dim, group, rank, world)


def gather_sequence(x: torch.Tensor, dim: int = 2, group=None) -> torch.Tensor:
    """The full tensor from every rank's zigzag shard: the inverse of ``shard_sequence``.

    Args:
        x: this rank's shard; the same shape and dtype on every rank, an even size along ``dim``.
        dim: the sequence dimension.
        group: the process group (None: the default group).

    Returns:
        The full tensor (W times longer along ``dim``, global order), the same on every rank.
        Differentiable: backward keeps this rank's shard of the gradient, which assumes every
        rank computes the same loss from the gathered tensor (a replicated loss).

    Example (under torchrun):
        >>> out = gather_sequence(context_parallel_attention(q_local, k_local, v_local, cfg))
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dim = _seq_dim(x, dim)
    _, world = _rank_and_world(group)
    _check_same_on_all_ranks("gather_sequence", [("ndim", (x.dim(),)), ("shard length", (x.shape[dim],)),
                                                 ("numel", (x.numel(),)), ("dtype", (_dtype_code(x.dtype),))],
                             group, x.device)
    _check_divisible(x.shape[dim] * world, world)
    return _GatherSequence.apply(x, dim, group, False)


def _check_local_shards(q, k, v, world: int, cfg: LongRoPEConfig) -> int:
    """Shape rules of the three local shards (identical on every rank by now); returns S."""
    check_gqa(q.shape[1], k.shape[1])
    if k.shape != v.shape:
        raise ValueError(f"k and v local shards must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must share the batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q, k and v local shards must have one length (the same zigzag split), "
                         f"got q {q.shape[2]} and k/v {k.shape[2]}")
    full_len = q.shape[2] * world
    _check_divisible(full_len, world)
    if full_len > cfg.max_position_embeddings:
        raise ValueError(f"the full sequence (S = {full_len}) passes max_position_embeddings "
                         f"({cfg.max_position_embeddings}) of the config")
    return full_len


def _gather_rotated_kv(k: torch.Tensor, v: torch.Tensor, cfg: LongRoPEConfig, positions: torch.Tensor,
                       regime_len: int, group):
    """Rotate the local keys at their global positions, then all-gather keys and values (one
    collective for both): full (B, H_kv, S, D) k_rot and v, differentiable."""
    # apply_rotary rotates q and k together; a zero-head q rotates only the keys.
    _, k_rot = apply_rotary(k[:, :0], k, cfg, position_ids=positions, seq_len=regime_len)
    kv_full = _GatherSequence.apply(torch.stack((k_rot, v)), 3, group, True)
    return kv_full.unbind(0)


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LongRoPEConfig,
                               group=None, causal: bool = True, softmax_scale: Optional[float] = None,
                               seq_len: Optional[int] = None) -> torch.Tensor:
    """``fused_rope_attention`` over a sequence sharded across ranks (zigzag, see shard_sequence).

    Args:
        q: (batch, q_heads, S / W, head_dim), this rank's shard from ``shard_sequence``.
        k, v: (batch, kv_heads, S / W, head_dim), sharded the same way; q_heads % kv_heads == 0.
            float16, bfloat16, float32 (float64 on CPU); one dtype and device; any strides.
        cfg: the LongRoPEConfig.
        group: the process group (None: the default group); every rank of it must call.
        causal: causal mask over the global positions.
        softmax_scale: default 1 / sqrt(head_dim).
        seq_len: the length that picks short vs long factors; default S, the full length
            (never the shard's). n_hat (cfg.start_token) applies to global positions.

    Returns:
        (batch, q_heads, S / W, head_dim) in q's dtype: this rank's shard of
        ``fused_rope_attention`` on the full tensors. Differentiable in q, k and v; each rank's
        gradients are those of its own shards (k and v gradients include every rank's queries).
        Every rank of the group must run backward, as with any collective.

    Example (``torchrun --nproc-per-node 2 script.py``; docs/distributed.md):
        >>> torch.distributed.init_process_group("nccl")
        >>> cfg = LongRoPEConfig(head_dim=64, original_max_position_embeddings=4096,
        ...                      max_position_embeddings=16384, long_factor=[4.0] * 32)
        >>> q, k, v = (torch.randn(1, h, 8192, 64, device="cuda") for h in (8, 2, 2))  # same seed on all ranks
        >>> out_local = context_parallel_attention(shard_sequence(q), shard_sequence(k),
        ...                                        shard_sequence(v), cfg)
    """
    check_config(cfg)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_heads(name, t, cfg)
    check_same("q, k and v", q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    seq_len = check_seq_len(seq_len)
    rank, world = _rank_and_world(group)
    _check_same_on_all_ranks("context_parallel_attention",
                             [("q", q.shape), ("k", k.shape), ("v", v.shape), ("dtype", (_dtype_code(q.dtype),))],
                             group, q.device)
    full_len = _check_local_shards(q, k, v, world, cfg)
    regime_len = full_len if seq_len is None else seq_len
    chunk = full_len // (2 * world)
    positions = zigzag_positions(full_len, group, device=q.device)
    k_full, v_full = _gather_rotated_kv(k, v, cfg, positions, regime_len, group)
    if not causal:  # every query sees every key: one call for both chunks
        return fused_rope_attention(q, k_full, v_full, cfg, position_ids=positions, causal=False,
                                    softmax_scale=softmax_scale, seq_len=regime_len, k_is_rotated=True)
    outs = []
    for local, global_chunk in ((0, rank), (1, 2 * world - 1 - rank)):
        # Keys up to the chunk's end: the bottom-right aligned causal mask of fused_rope_attention
        # is then exactly the global one (query at position p sees keys 0 .. p).
        end = (global_chunk + 1) * chunk
        outs.append(fused_rope_attention(
            q[:, :, local * chunk:(local + 1) * chunk], k_full[:, :, :end], v_full[:, :, :end], cfg,
            position_ids=positions[local * chunk:(local + 1) * chunk], causal=True,
            softmax_scale=softmax_scale, seq_len=regime_len, k_is_rotated=True))
    return torch.cat(outs, dim=2)

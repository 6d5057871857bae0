"""context_parallel_attention over real process groups vs fused_rope_attention on the full tensors.

Each world size spawns its gloo ranks (CPU) once, in a module fixture, and runs every case of
that size inside the one group; each test then reads its case's result from every rank. A rank
computes the single-process reference itself, on the same seeded full tensors, and compares the
output and gradients gathered from all shards: fp32 within 2e-5 of the reference (relative to its
scale); fp16/bf16 within 2x the error of PyTorch's own computation in that dtype against float64
(the rule of test_attention). bf16 runs the PyTorch path on the CPU (the interpreter has no bf16).

Children inherit TRITON_INTERPRET: with it the kernels run in Triton's interpreter, without it
the PyTorch path. The spawn is bounded in time; stragglers are killed and the test fails.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import traceback

import pytest
import torch
import torch.distributed as dist

import longrope_triton.distributed as cp
from longrope_triton import LongRoPEConfig, fused_rope_attention
from longrope_triton.distributed import (context_parallel_attention, gather_sequence, shard_sequence,
                                         zigzag_positions)
from longrope_triton.reference import fused_rope_attention_reference

SPAWN_TIMEOUT_S = 240  # a whole group, all its cases; ~25 s on 2 cores under TRITON_INTERPRET=1
SKIP = "SKIP: "  # a case's result that starts so is a skip, not a failure


# ---------------------------------------------------------------------------- helpers (run in the ranks)
def make_cfg(head_dim, original, start_token=0, rotary_dim=None, interleaved=False):
    """Factors that differ per dimension and between regimes, so a wrong regime or index shows."""
    r = rotary_dim or head_dim
    g = torch.Generator().manual_seed(1)
    return LongRoPEConfig(head_dim=head_dim, rotary_dim=rotary_dim, original_max_position_embeddings=original,
                          max_position_embeddings=4096,
                          long_factor=torch.sort(1 + 6 * torch.rand(r // 2, generator=g)).values.tolist(),
                          short_factor=(1 + 0.2 * torch.rand(r // 2, generator=g)).tolist(),
                          start_token=start_token, interleaved=interleaved)


def make_full(batch, hq, hkv, seq, d, dtype, bshd=False):
    """Full q, k, v and an output gradient, identical on every rank (seeded here)."""
    torch.manual_seed(1234)

    def one(h):
        if bshd:
            return torch.randn(batch, seq, h, d, dtype=dtype).transpose(1, 2)
        return torch.randn(batch, h, seq, d, dtype=dtype)
    return one(hq), one(hkv), one(hkv), one(hq)


def as_bshd(t):
    """The same values laid out (batch, seq, heads, dim), seen as a non-contiguous (B, H, S, D) view."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def grads_of(fn, tensors, grad_out):
    """fn's output and the gradients of all inputs from one backward pass."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


def assert_fp32_close(name, actual, expected):
    err = float((actual.double() - expected.double()).abs().max())
    bound = 2e-5 * max(1.0, float(expected.abs().max()))
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def assert_half_close(name, actual, reference64, eager):
    err = float((actual.double() - reference64).abs().max())
    bound = 2 * float((eager.double() - reference64).abs().max()) + 1e-4
    assert err <= bound, f"{name}: max error {err:.3e} > 2x PyTorch's {eager.dtype} error + 1e-4 = {bound:.3e}"


def distributed_grads(q, k, v, grad_out, cfg, bshd=False, **kwargs):
    """The full output and q/k/v gradients, gathered from every rank's shards. Each rank's loss
    is its own output shard's; their sum is the full loss, so each shard gradient is the full
    gradient's shard."""
    shards = [as_bshd(shard_sequence(t)) if bshd else shard_sequence(t) for t in (q, k, v)]
    before = [s.clone() for s in shards]
    ours = grads_of(lambda *x: context_parallel_attention(*x, cfg, **kwargs), shards, shard_sequence(grad_out))
    for b, s in zip(before, shards):
        assert torch.equal(b, s), "context_parallel_attention modified its input"
    return [gather_sequence(t) for t in ours]


# ---------------------------------------------------------------------------- cases (run in the ranks)
def case_matches_full(batch, hq, hkv, seq, d, causal, dtype, original, start_token=0, bshd=False,
                      rotary_dim=None, interleaved=False, **kwargs):
    cfg = make_cfg(d, original, start_token, rotary_dim, interleaved)
    q, k, v, grad_out = make_full(batch, hq, hkv, seq, d, dtype, bshd)
    ours = distributed_grads(q, k, v, grad_out, cfg, bshd, causal=causal, **kwargs)
    names = ("out", "dq", "dk", "dv")
    if dtype == torch.float32:
        full = grads_of(lambda *x: fused_rope_attention(*x, cfg, causal=causal, **kwargs), (q, k, v), grad_out)
        for name, a, b in zip(names, ours, full):
            assert_fp32_close(name, a, b)
    else:
        ref = grads_of(lambda *x: fused_rope_attention_reference(*x, cfg, causal=causal, **kwargs),
                       [t.double() for t in (q, k, v)], grad_out.double())
        eager = grads_of(lambda *x: fused_rope_attention_reference(*x, cfg, causal=causal, dtype=dtype, **kwargs),
                         (q, k, v), grad_out)
        for name, a, r, e in zip(names, ours, ref, eager):
            assert a.dtype == dtype, f"{name} has dtype {a.dtype}"
            assert_half_close(name, a, r, e)


def case_long_regime_from_full_length():
    """S = 32 > original 24 picks the long factors although each shard (16 tokens; on rank 1
    positions 8..23) is within 24; n_hat = 3 holds only on rank 0's positions."""
    case_matches_full(1, 4, 2, 32, 32, True, torch.float32, original=24, start_token=3)
    cfg = make_cfg(32, 24, 3)
    q, k, v, _ = make_full(1, 4, 2, 32, 32, torch.float32)
    # The test can fail: the shard's own regime (short) gives other numbers.
    short = fused_rope_attention(q, k, v, cfg, seq_len=16)
    assert not torch.allclose(shard_sequence(short), context_parallel_attention(
        *(shard_sequence(t) for t in (q, k, v)), cfg), atol=1e-4)


def case_replicated_gradients():
    """gather(attention(shard(x))) on replicated full tensors equals single-process autograd on
    every rank: output and complete q, k, v gradients (a replicated loss on the gathered output)."""
    cfg = make_cfg(16, 16, start_token=2)
    q, k, v, grad_out = make_full(1, 4, 2, 24, 16, torch.float32)

    def sharded(*full):
        return gather_sequence(context_parallel_attention(*(shard_sequence(t) for t in full), cfg))
    ours = grads_of(sharded, (q, k, v), grad_out)
    full = grads_of(lambda *x: fused_rope_attention(*x, cfg), (q, k, v), grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, full):
        assert_fp32_close(name, a, b)


def case_layout():
    """zigzag_positions, shard_sequence on token ids (dim=1) and gather_sequence round trip."""
    rank, world = dist.get_rank(), dist.get_world_size()
    c = 3
    expected = torch.cat((torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * world - 1 - rank) * c,
                                                                              (2 * world - rank) * c)))
    assert torch.equal(zigzag_positions(2 * world * c), expected)
    ids = torch.arange(2 * 2 * world * c).view(2, -1)
    assert torch.equal(shard_sequence(ids, dim=1), ids[:, expected])
    x = torch.randn(2, 3, 2 * world * c, 5)
    assert torch.equal(gather_sequence(shard_sequence(x, dim=-2), dim=-2), x)


def case_reduce_scatter_branch():
    """The NCCL branch of the K/V gradient reduction (reduce_scatter), run on gloo where this
    PyTorch's gloo has reduce_scatter; the CPU otherwise takes all-reduce + slicing."""
    try:
        dist.reduce_scatter(torch.empty(1), [torch.ones(1)] * dist.get_world_size())
    except RuntimeError as exc:
        return f"{SKIP}gloo has no reduce_scatter in this PyTorch ({exc})"
    original = cp._backend_has_reduce_scatter
    cp._backend_has_reduce_scatter = lambda t, group: True
    try:
        case_matches_full(1, 2, 1, 24, 16, True, torch.float32, original=16, start_token=2)
    finally:
        cp._backend_has_reduce_scatter = original
    return None


def expect_error(exc_type, match, fn):
    try:
        fn()
    except exc_type as exc:
        assert match in str(exc), f"{exc_type.__name__} without {match!r}: {exc}"
        return
    raise AssertionError(f"no {exc_type.__name__} ({match!r})")


def case_bad_input():
    """Every check raises on every rank (no rank is left waiting in a collective)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = make_cfg(16, 16)
    odd = 2 * world + 2  # not a multiple of 2 * world
    expect_error(ValueError, f"S = {odd}, W = {world}", lambda: shard_sequence(torch.zeros(1, 1, odd, 16)))
    expect_error(ValueError, f"S = {7 * world}, W = {world}",
                 lambda: context_parallel_attention(*(torch.zeros(1, 2, 7, 16),) * 3, cfg))
    q = torch.zeros(1, 2, 8, 16)
    expect_error(ValueError, "one length", lambda: context_parallel_attention(q, q[:, :, :6], q[:, :, :6], cfg))
    long_q = torch.zeros(1, 1, 2 * (4096 // (2 * world)) + 2, 16)  # S just past 4096
    expect_error(ValueError, "max_position_embeddings", lambda: context_parallel_attention(long_q, long_q, long_q, cfg))
    # Shards of different lengths on different ranks: the same error everywhere.
    mine = torch.zeros(1, 2, 8 + 4 * rank, 16)
    expect_error(ValueError, "disagree", lambda: context_parallel_attention(mine, mine, mine, cfg))
    expect_error(ValueError, "disagree", lambda: gather_sequence(mine))
    # Still in step: a correct call goes through afterwards.
    assert context_parallel_attention(q, q, q, cfg).shape == q.shape


CASES = {
    2: {
        "W2-B1-H4/2-S32-D32-causal-long-nhat3-fp32": case_long_regime_from_full_length,
        "W2-B2-H2/2-S24-D16-noncausal-bshd-scale0.3-fp32": lambda: case_matches_full(
            2, 2, 2, 24, 16, False, torch.float32, original=16, bshd=True, softmax_scale=0.3),
        "W2-B1-H4/2-S32-D32-causal-nhat3-fp16": lambda: case_matches_full(
            1, 4, 2, 32, 32, True, torch.float16, original=24, start_token=3),
        "W2-B1-H4/2-S32-D32-causal-nhat3-bf16": lambda: case_matches_full(
            1, 4, 2, 32, 32, True, torch.bfloat16, original=24, start_token=3),
        "W2-B1-H2/1-S24-D16-r8-interleaved-seq_len16-fp32": lambda: case_matches_full(
            1, 2, 1, 24, 16, True, torch.float32, original=20, rotary_dim=8, interleaved=True, seq_len=16),
        "W2-replicated-gather-gradients": case_replicated_gradients,
        "W2-B1-H2/1-S24-D16-causal-reduce-scatter-fp32": case_reduce_scatter_branch,
        "W2-layout": case_layout,
        "W2-bad-input": case_bad_input,
    },
    3: {
        "W3-B1-H3/1-S36-D32-causal-long-nhat5-fp32": lambda: case_matches_full(
            1, 3, 1, 36, 32, True, torch.float32, original=24, start_token=5),
        "W3-B1-H4/2-S24-D16-noncausal-fp32": lambda: case_matches_full(
            1, 4, 2, 24, 16, False, torch.float32, original=16),
        "W3-layout": case_layout,
        "W3-bad-input": case_bad_input,
    },
}


# ---------------------------------------------------------------------------- spawning
def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank: join the group, run every case of this world size, write {case: error, skip or ""}."""
    torch.set_num_threads(1)  # ranks share the CI's two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=SPAWN_TIMEOUT_S))
    results = {}
    for name, case in CASES[world].items():
        try:
            results[name] = case() or ""
        except Exception:  # noqa: BLE001 - reported to the parent test, which fails with it
            results[name] = traceback.format_exc()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(results, f)


def run_group(world: int, tmp_path) -> dict:
    """Spawn ``world`` ranks, wait (bounded), kill stragglers; {case: {rank: error or ""}}."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, world, str(tmp_path / "pg"), str(tmp_path)))
             for r in range(world)]
    with pytest.MonkeyPatch.context() as env:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setenv(var, "1")  # the interpreter's numpy: one BLAS thread per rank, not one per core
        for p in procs:
            p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=SPAWN_TIMEOUT_S)
    for p in procs:
        p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
    stragglers = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in stragglers:
        procs[r].kill()
        procs[r].join()
    if stragglers:
        pytest.fail(f"ranks {stragglers} of {world} still running after {SPAWN_TIMEOUT_S} s (killed)")
    results = {}
    for r, p in enumerate(procs):
        path = tmp_path / f"rank{r}.json"
        if not path.exists():
            pytest.fail(f"rank {r} of {world} exited with code {p.exitcode} without results")
        for name, error in json.loads(path.read_text(encoding="utf-8")).items():
            results.setdefault(name, {})[r] = error
    return results


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    """Results per world size, spawned at most once per world size for the whole module."""
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = run_group(world, tmp_path_factory.mktemp(f"world{world}"))
        return cache[world]
    return get


@pytest.mark.parametrize("world,name", [pytest.param(w, n, id=n) for w, cases in CASES.items() for n in cases])
def test_context_parallel(group_results, world, name):
    per_rank = group_results(world)[name]
    skips = [err for err in per_rank.values() if err.startswith(SKIP)]
    if skips:
        pytest.skip(skips[0][len(SKIP):])
    failures = [f"rank {r}:\n{err}" for r, err in sorted(per_rank.items()) if err]
    assert len(per_rank) == world and not failures, "\n".join(failures)


def test_no_process_group_raises():
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_sequence(torch.zeros(1, 1, 8, 16))

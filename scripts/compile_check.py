"""Compile every kernel variant the launchers can pick for a GPU target, without a GPU.

The interpreter checks what the kernels compute; this checks what each variant costs on the
device: shared memory against the block limit, registers, spills. It compiles what a launch
compiles: the launchers run on CPU tensors of representative shapes with the kernel launch
recorded instead of executed, and each recorded launch is compiled with ``JITFunction.warmup``
against a stand-in driver for the target, so Triton derives the same specialization as at run
time (16-byte-aligned pointers, strides divisible by 16, unit strides as constants), for every
tile config the autotuner may choose for that launch.

Every compiled launch is also disassembled and its loops counted (scripts/sass_report.py):
instructions per kFLOP of MMA work in the steady-state loop, MMA kinds, local loads/stores.

Run: ``python scripts/compile_check.py [--arch 90] [--dtypes bf16,fp16] [--json out.json]
[--sass sass.json]``; exits 1 when a variant breaks the rules of sass_report.problems (compile
error, shared memory over a block, spill, local memory in a loop, mma.sync where budgeted) or a
steady-state loop is over the instruction budget (sass_report.budget_problems).
tests/test_compile_budget.py runs it for bf16 and fp16 in CI.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, whatever the caller's environment
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launches pin it; silences Triton 3.9's warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

from longrope_triton import _dispatch, attention, rotary  # noqa: E402
from longrope_triton.config import LongRoPEConfig  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sass_report  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TargetDriver:
    """The slice of Triton's driver interface that compiling (warmup) needs, for a chosen target."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One call of the attention forward + backward, as a user makes it."""

    dtype: str
    head_dim: int
    rotary_dim: int
    causal: bool
    varlen: bool
    interleaved: bool = False
    seq_q: int = 256  # 1: a decode step (the split-KV kernels)
    tma: bool = True  # loops load through TMA tensor descriptors (sm_90 with a layout that allows it)
    seqused: bool = False  # a static cache: seqused_k per batch row (decode: HAS_USED; prefill: per-row ranges)

    @property
    def default_path(self) -> bool:
        """Held to the resource rules (problems): every half-precision variant; fp32 inputs are
        reported, not budgeted."""
        return self.dtype in ("bf16", "fp16")


def record_launches(variant: Variant, seq_k: int = 256):
    """The kernel launches (name, kernel, tuned, args, meta) of one forward and backward."""
    calls = []

    def record(name, kernel, grid, args, meta, tuned=None, interpret_meta=None):
        calls.append((name, kernel, tuned, args, _dispatch.launch_meta(args, meta)))

    dtype = DTYPES[variant.dtype]
    batch, hq, hk = 2 if variant.seqused else 1, 8, 2  # two rows with their own key counts: per-row ranges
    cfg = LongRoPEConfig(head_dim=variant.head_dim, rotary_dim=variant.rotary_dim,
                         original_max_position_embeddings=4096, max_position_embeddings=131072,
                         interleaved=variant.interleaved)
    q = torch.zeros(batch, hq, variant.seq_q, variant.head_dim, dtype=dtype)
    k = torch.zeros(batch, hk, seq_k, variant.head_dim, dtype=dtype)
    v = torch.zeros_like(k)
    cu = torch.tensor([0, 100, seq_k], dtype=torch.int32) if variant.varlen else None
    used = torch.tensor([seq_k - 37, seq_k], dtype=torch.int32) if variant.seqused else None
    plan = attention._Plan(cfg, q, k, None, None, cu, cu, None, seqused_k=used)
    scale = variant.head_dim ** -0.5
    saved = _dispatch.launch, _dispatch.tma_enabled
    _dispatch.launch, _dispatch.tma_enabled = record, lambda device: variant.tma
    try:
        out, lse, q_rot, k_rot = attention.attention_forward(q, k, v, cfg, plan, variant.causal, scale, True, True)
        attention.attention_backward(torch.zeros_like(out), q_rot, k_rot, v, out, lse, None, cfg, plan,
                                     variant.causal, scale, True, True)
    finally:
        _dispatch.launch, _dispatch.tma_enabled = saved
    return calls


def tile_configs(tuned, args, meta):
    """The configs the launcher may pick for this launch: the autotuner's pruned list, or the
    launch's own fixed warps and stages (popped from ``meta``, which then holds the constexprs)."""
    if tuned is None:
        return [triton.Config({}, num_warps=meta.pop("num_warps", 4), num_stages=meta.pop("num_stages", 3))]
    named = dict(zip(tuned.arg_names, args))
    return tuned.early_config_prune(tuned.configs, named, **meta)


def resource_usage(cubin: bytes):
    """(registers, stack bytes) per thread from cuobjdump. Triton kernels make no calls and keep
    no local arrays, so a stack frame is register spills (ptxas -v: "bytes spill stores")."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else -1


def compile_launch(kernel, args, meta, config, arch):
    """(shared bytes, registers, spill bytes, cubin) of one launch compiled for sm_<arch>."""
    driver.set_active(TargetDriver(arch))
    if config.pre_hook:  # descriptor block shapes of this config, as the autotuner sets them
        config.pre_hook({**dict(zip(kernel.arg_names, args)), **meta, **config.kwargs})
    compiled = kernel.warmup(*args, grid=(1,), **meta, **config.kwargs, num_warps=config.num_warps,
                             num_stages=config.num_stages, **_dispatch.LAUNCH_OPTIONS)
    cubin = compiled.asm["cubin"]
    return (compiled.metadata.shared,) + resource_usage(cubin) + (cubin,)


SHAPES = [(64, 64), (80, 80), (96, 96), (128, 128), (128, 96), (256, 256)]  # (head_dim, rotary_dim)


def variants(dtypes):
    """Every variant a user can reach in these dtypes: head_dims 64-256 (partial rotary included),
    causal or not, packed (varlen) or not, a static cache (seqused_k) or not, TMA or pointer loads,
    one interleaved config, and decode steps (Sq = 1) with and without a static cache."""
    for dtype, (d, r), causal, varlen, tma in itertools.product(dtypes, SHAPES, (True, False), (False, True),
                                                                 (True, False)):
        yield Variant(dtype, d, r, causal, varlen, tma=tma)
    for dtype, (d, r), causal, tma in itertools.product(dtypes, SHAPES, (True, False), (True, False)):
        yield Variant(dtype, d, r, causal, False, tma=tma, seqused=True)
    yield Variant(dtypes[0], 128, 128, True, False, interleaved=True)
    for dtype, d, causal, seqused in itertools.product(dtypes, (64, 128, 256), (True, False), (False, True)):
        yield Variant(dtype, d, d, causal, False, seq_q=1, seqused=seqused)


def jobs_of(variant_list):
    """Unique compilations with the variants each covers: [head_dim, causal, packed], and apart
    [head_dim, causal] of static-cache (seqused_k) calls. The attention kernels depend on head_dim only
    through BLOCK_D (head_dim is a runtime argument), not on rotary_dim or the pair layout, and on causal
    masks, packing and a static cache's key counts not at all in the prefill kernels (they are row
    ranges, data; per-row ranges are a runtime batch stride) — the decode kernel has a HAS_USED variant.
    ``rank`` is the config's place in the launch's list (0: the one LONGROPE_TRITON_PIN_TILES=1 runs)."""
    seen = {}
    for variant in variant_list:
        for name, kernel, tuned, args, meta in record_launches(variant):
            meta = dict(meta)
            for rank, config in enumerate(tile_configs(tuned, args, meta)):
                key = (name, variant.dtype, tuple(sorted(meta.items())), str(config.kwargs), config.num_warps,
                       config.num_stages)
                covers, static = seen.setdefault(key, (name, kernel, args, meta, config, rank, variant, set(),
                                                       set()))[-2:]
                if variant.seqused:
                    static.add((variant.head_dim, variant.causal))
                else:
                    covers.add((variant.head_dim, variant.causal, variant.varlen))
    return list(seen.values())


_JOBS: list = []  # set before the worker processes fork: kernels and tensors are not sent to them


def run_job(index: int, arch: int):
    name, kernel, args, meta, config, rank, variant, covers, static = _JOBS[index]
    record = dict(kernel=name, dtype=variant.dtype, head_dims=sorted({c[0] for c in covers | static}),
                  covers=sorted(covers), covers_seqused_k=sorted(static), rotary_dim=None,
                  **{k.lower(): v for k, v in meta.items() if k.isupper() and k != "ROTARY_DIM"},
                  **{k.lower(): v for k, v in config.kwargs.items()}, warps=config.num_warps,
                  stages=config.num_stages, rank=rank, default_path=variant.default_path)
    if "ROTARY_DIM" in meta:  # the forward and the rotary kernel; the backward does not depend on it
        record["rotary_dim"] = meta["ROTARY_DIM"]
    try:
        record["shared"], record["registers"], record["spill_bytes"], cubin = compile_launch(kernel, args, meta,
                                                                                             config, arch)
        record["sass"] = sass_report.analyze(cubin, config.num_warps)
    except Exception as exc:  # noqa: BLE001 - report every failing variant, then exit non-zero
        record["error"] = str(exc).strip().splitlines()[-1][:300]
    return record


def summary(record):
    """The record without the per-loop counts (those go to --sass)."""
    sass = record.get("sass")
    if sass is None:
        return record
    return {**record, "sass": {k: v for k, v in sass.items() if k != "loops"}}


def new_variants_across_lengths(lengths=(1000, 256, 77), arch: int = 90) -> dict:
    """Kernels compiled by bf16 head_dim-128 calls that differ only in sequence length, beyond those the
    first length compiled; then by the same calls on a static cache (seqused_k, " (seqused_k)"), beyond
    those the plain calls compiled (all 0: lengths are not specialized, a new length compiles nothing,
    and the prefill kernels' per-row ranges are data). Only the rotary kernel may compile launches of its
    own at a static cache's first length (its query and key positions differ: two launches, not one)."""
    driver.set_active(TargetDriver(arch))
    counts = {}

    def compile_calls(length, seqused):
        variant = Variant("bf16", 128, 128, True, False, seq_q=length, seqused=seqused)
        for name, kernel, tuned, args, meta in record_launches(variant, seq_k=length):
            meta = dict(meta)
            compile_launch(kernel, args, meta, tile_configs(tuned, args, meta)[0], arch)
            counts[name] = sum(len(cache[0]) for cache in kernel.device_caches.values())
        return dict(counts)

    extra = {}
    for seqused in (False, True):
        before = dict(counts)
        first = last = compile_calls(lengths[0], seqused)
        for length in lengths[1:]:
            last = compile_calls(length, seqused)
        for name, n in last.items():
            base = before[name] if seqused and name != "rotary" else first[name]
            extra[name + (" (seqused_k)" if seqused else "")] = n - base
    return extra


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32",
                        help="comma-separated; the budget (no spills) holds for bf16 and fp16, fp32 is reported")
    parser.add_argument("--json", help="write every record here (the steady-state loop of each, not every loop)")
    parser.add_argument("--sass", help="write every record with every loop's SASS counts here")
    parser.add_argument("--head-dims", help="comma-separated subset of the head_dims compiled (default: all)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--lengths", action="store_true",
                        help="only check that calls differing in sequence length compile no new kernel")
    args = parser.parse_args(argv)
    if args.lengths:
        extra = new_variants_across_lengths(arch=args.arch)
        print(json.dumps(extra))
        return 0 if not any(extra.values()) else 1
    dims = None if args.head_dims is None else {int(d) for d in args.head_dims.split(",")}
    _JOBS[:] = jobs_of(v for v in variants(args.dtypes.split(",")) if dims is None or v.head_dim in dims)
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        records = list(pool.map(run_job, range(len(_JOBS)), itertools.repeat(args.arch)))
    failures = 0
    for r in records:
        why = sass_report.problems(r, args.arch)
        failures += bool(why)
        tile = f"M{r.get('block_m', '-')} N{r.get('block_n', '-')}"
        dims = "/".join(map(str, r["head_dims"]))
        print(f"{'FAIL' if why else 'ok  '} {r['kernel']:30s} {r['dtype']} d{dims} r{r['rotary_dim']} {tile} "
              f"w{r['warps']} s{r['stages']} tma={r.get('use_tma', '-')} "
              f"{'has_used ' if r.get('has_used') else ''}shared={r.get('shared')} regs={r.get('registers')} "
              f"spill={r.get('spill_bytes')} inst/kFLOP={sass_report.steady_figure(r)} {'; '.join(why)}", flush=True)
    over = sass_report.budget_problems(records)
    for line in over:
        print(f"FAIL {line}", flush=True)
    print(f"{len(records) - failures}/{len(records)} variants within the resource rules, {len(over)} steady-state "
          f"loops over the instruction budget, for sm_{args.arch} (triton {triton.__version__})")
    header = {"arch": args.arch, "triton": triton.__version__, "estimate": sass_report.ESTIMATE}
    if args.sass:  # one record a line: large, but each line reads (and diffs) on its own
        with open(args.sass, "w") as f:
            f.write(json.dumps(header)[:-1] + ', "records": [\n' + ",\n".join(map(json.dumps, records)) + "\n]}\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "records": [summary(r) for r in records]}, f, indent=1)
    return 1 if failures or over else 0


if __name__ == "__main__":
    sys.exit(main())

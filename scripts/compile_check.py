"""Compile every kernel for a GPU target without a GPU (Triton -> PTX -> cubin with ptxas).

The interpreter checks what the kernels compute; this checks that the compiler accepts
them and what each variant costs: shared memory against the device's limit, registers,
spills. Run: ``python scripts/compile_check.py [--arch 90] [--quick]``; exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, whatever the caller's environment

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from longrope_triton._dispatch import LAUNCH_OPTIONS  # noqa: E402
from longrope_triton.attention import _TILES  # noqa: E402
from longrope_triton.kernels.attention_bwd import (attention_bwd_dkdv_kernel, attention_bwd_dq_kernel,  # noqa: E402
                                                   attention_bwd_preprocess_kernel)
from longrope_triton.kernels.attention_fwd import attention_fwd_kernel  # noqa: E402
from longrope_triton.kernels.rotary import rotary_kernel  # noqa: E402

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes per block (opt-in maximum)
TYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def signature(kernel, dtype: str, constexprs: dict) -> dict:
    """Triton types for every argument, from naming conventions of the kernels."""
    out = {}
    for name in kernel.arg_names:
        if name in constexprs:
            out[name] = "constexpr"
        elif name in ("p_lse", "p_delta", "p_tab"):
            out[name] = "*fp32"
        elif name in ("p_qpos", "p_kpos", "p_pos", "p_cu_q", "p_cu_k"):
            out[name] = "*i64"
        elif name == "p_seq_set":
            out[name] = "*i32"
        elif name.startswith("p_"):
            out[name] = TYPES[dtype]
        elif name in ("qk_scale", "softmax_scale"):
            out[name] = "fp32"
        else:
            out[name] = "i32"
    return out


def compile_one(kernel, dtype, constexprs, num_warps, num_stages, arch):
    src = ASTSource(fn=kernel, signature=signature(kernel, dtype, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages, **LAUNCH_OPTIONS})
    return (compiled.metadata.shared,) + resource_usage(compiled.asm["cubin"])


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


# (rotary_dim, head_dim, row class of the launcher for bf16)
SHAPES = [(64, 64, "narrow"), (80, 80, "narrow"), (128, 128, "narrow"), (64, 128, "narrow"), (96, 128, "wide"),
          (256, 256, "wide")]


def attention_variants(quick: bool):
    """(meta-parameters, row class) per shape x causal x K rotation x varlen, as the launcher builds them."""
    shapes = [s for s in SHAPES if not quick or s[1] in (128, 256)]
    for (r, d, row_class), causal, rotate_k, varlen in itertools.product(shapes, (True, False), (True, False),
                                                                          (False, True)):
        # --quick: every switch on head_dim 128, the causal fully-rotated variant of the other shapes
        if quick and (r, d) != (128, 128) and (varlen or not rotate_k or not causal):
            continue
        if quick and (r, d) == (128, 128) and not causal:
            continue
        pass_dim = d - r
        yield dict(ROTARY_DIM=r, BLOCK_HALF=max(16, triton.next_power_of_2(r // 2)),
                   BLOCK_PASS=max(16, triton.next_power_of_2(pass_dim)) if pass_dim else 0,
                   BLOCK_DV=max(16, triton.next_power_of_2(d)), CAUSAL=causal, INTERLEAVED=False, ROTATE_Q=True,
                   ROTATE_K=rotate_k, IS_VARLEN=varlen, DOT_PRECISION="tf32", INT64=False), row_class


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args(argv)
    failures = 0
    jobs = []
    for meta, row_class in attention_variants(args.quick):
        for kernel, name in ((attention_fwd_kernel, "fwd"), (attention_bwd_dkdv_kernel, "dkdv"),
                             (attention_bwd_dq_kernel, "dq")):
            for m, n, warps, stages in _TILES[name][row_class]:
                jobs.append((kernel, "bf16", {**meta, "BLOCK_M": m, "BLOCK_N": n}, warps, stages))
            if meta["ROTARY_DIM"] == 128 and meta["BLOCK_DV"] == 128 and meta["ROTATE_K"]:
                # the int64-offset variant (tensors past 2^31 elements), at the first tile of the list
                m, n, warps, stages = _TILES[name][row_class][0]
                jobs.append((kernel, "bf16", {**meta, "INT64": True, "BLOCK_M": m, "BLOCK_N": n}, warps, stages))
    for (r, d, inter), int64 in itertools.product(((64, 64, False), (128, 128, True), (48, 80, False)),
                                                  (False, True)):
        jobs.append((rotary_kernel, "bf16", dict(ROTARY_DIM=r, BLOCK_S=32, BLOCK_HALF=triton.next_power_of_2(r // 2),
                                                 BLOCK_PASS=triton.next_power_of_2(d - r) if d > r else 0,
                                                 INTERLEAVED=inter, CONJUGATE=False, INT64=int64), 4, 3))
    for int64 in (False, True):
        jobs.append((attention_bwd_preprocess_kernel, "bf16", dict(BLOCK_M=64, BLOCK_DV=128, INT64=int64), 4, 3))
    limit = SHARED_LIMIT.get(args.arch, 101376)
    for kernel, dtype, constexprs, warps, stages in jobs:
        label = (f"{kernel.fn.__name__:30s} r{constexprs.get('ROTARY_DIM', '-')} dv{constexprs.get('BLOCK_DV', '-')} "
                 f"M{constexprs.get('BLOCK_M', '-')} N{constexprs.get('BLOCK_N', '-')} w{warps} s{stages} "
                 f"causal={constexprs.get('CAUSAL', '-')} rotK={constexprs.get('ROTATE_K', '-')} "
                 f"varlen={constexprs.get('IS_VARLEN', '-')} int64={constexprs.get('INT64')}")
        try:
            shared, regs, spills = compile_one(kernel, dtype, constexprs, warps, stages, args.arch)
        except Exception as exc:  # noqa: BLE001 - report every failing variant, then exit non-zero
            failures += 1
            print(f"FAIL {label}: {str(exc).strip().splitlines()[-1][:300]}", flush=True)
            continue
        if shared > limit:
            failures += 1
        over = f" OVER THE SHARED-MEMORY LIMIT ({limit})" if shared > limit else ""
        print(f"ok   {label} shared={shared} regs={regs} spill_stack={spills}{over}", flush=True)
    print(f"{len(jobs) - failures}/{len(jobs)} variants compiled for sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

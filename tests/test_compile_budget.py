"""The register budget as a test: every attention kernel variant the launcher can pick compiles for
sm_90 (H100/H200) with no register spill and within the shared memory of a block.

scripts/compile_check.py compiles what a launch compiles (the launch's own specialization, every
tile config the autotuner may choose) for bf16 and fp16, head_dim 64-256, causal or not, packed
or not; it needs only Triton's bundled ptxas/cuobjdump, no GPU. The figures are in docs/kernels.md.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import triton

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOLS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    if not (TOOLS / "cuobjdump").exists() or not (TOOLS / "ptxas").exists():
        pytest.skip("Triton's bundled ptxas/cuobjdump are not installed")
    out = tmp_path_factory.mktemp("compile") / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_check.py"), "--arch", "90",
                           "--dtypes", "bf16,fp16", "--json", str(out)], capture_output=True, text=True, env=env,
                          timeout=1200)
    if not out.exists():
        pytest.fail(f"compile_check.py wrote no results:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())["records"], proc


def test_every_default_variant_compiles_without_spills(records):
    recs, proc = records
    bad = [r for r in recs if "error" in r or r["shared"] > 232448 or r["spill_bytes"] > 0]
    assert not bad, "variants over budget:\n" + "\n".join(json.dumps(r) for r in bad) + "\n" + proc.stdout[-2000:]
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_the_budget_covers_what_the_issue_names(records):
    """Every kernel, both half-precision dtypes, head_dim 64/80/96/128/256, causal and not, varlen."""
    recs, _ = records
    kernels = {"attention forward", "attention backward dK/dV", "attention backward dQ"}
    for kernel in kernels:
        for dtype in ("bf16", "fp16"):
            mine = [r for r in recs if r["kernel"] == kernel and r["dtype"] == dtype]
            dims = set().union(*(r["head_dims"] for r in mine))
            assert {64, 80, 96, 128, 256} <= dims, (kernel, dtype, dims)
            assert {r["causal"] for r in mine} == {True, False}
            assert {r["is_varlen"] for r in mine} == {True, False}
    assert any(r["kernel"] == "rotary" for r in recs)
    for kernel in ("attention decode", "attention decode merge"):
        assert {r["dtype"] for r in recs if r["kernel"] == kernel} == {"bf16", "fp16"}, kernel


def test_a_new_sequence_length_compiles_no_new_kernel():
    """Autotune keys and specialization exclude lengths (and the LSE strides that follow them)."""
    if not (TOOLS / "ptxas").exists():
        pytest.skip("Triton's bundled ptxas is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_check.py"), "--lengths"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"new kernels per length: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"

"""The sm_90 budget as a test, read from what a launch compiles (no GPU needed).

scripts/compile_check.py compiles every kernel variant the launchers can pick for sm_90 (H100/H200)
with the launch's own specialization, for bf16 and fp16, head_dim 64-256, causal or not, packed or
not, a static cache (seqused_k: per-row ranges, the decode kernel's HAS_USED variant) or not, on
both load paths (TMA descriptors and pointers), every tile config of the lists, and disassembles each
(scripts/sass_report.py). The rules (docs/kernels.md, issue 18):

- every variant compiles within the shared memory of a block;
- forward, dK/dV and dQ: the steady-state loop issues at most the anchor's instructions per kFLOP
  of MMA work (per warp) for the pinned config (LONGROPE_TRITON_PIN_TILES=1: the first of each list)
  and the best one, every other listed config within 1.25x; wgmma only (no mma.sync) for head_dim
  64-128; no local loads or stores inside any loop; at most 256 B/thread of spill;
- head_dim 256, the rotary, preprocess and decode kernels: no spill at all (the decode loops are
  reported, not budgeted: their small tiles may use mma.sync).

The instruction budget holds for the Triton the tile lists were set on (sass_report.BUDGET_TRITON,
the test extra's pin); the resource rules hold for every supported Triton: scripts/test_oldest.sh runs
this module (marker ``sm90``) with the oldest one too, where the launcher takes its own tiles.
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
sys.path.insert(0, str(ROOT / "scripts"))
from sass_report import ATTENTION, BUDGET_TRITON, budget_problems, problems  # noqa: E402 - the rules, one place

pytestmark = pytest.mark.sm90  # also run with the oldest supported Triton
TRITON = tuple(int(part) for part in triton.__version__.split(".")[:2])


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


def describe(r) -> str:
    if "error" in r:
        return f"{r['kernel']} {r['dtype']} d{r['head_dims']}"
    steady = r["sass"]["steady_state"] or {}
    return (f"{r['kernel']} {r['dtype']} d{'/'.join(map(str, r['head_dims']))} tma={r.get('use_tma')} "
            f"M{r.get('block_m')} N{r.get('block_n')} w{r['warps']} s{r['stages']} (rank {r['rank']}): "
            f"spill {r['spill_bytes']} B, {steady.get('inst_per_kflop')} inst/kFLOP")


def test_every_variant_within_the_resource_rules(records):
    """Compiles, fits a block's shared memory; spill within the allowance and never inside a loop;
    wgmma only where budgeted (sass_report.problems)."""
    recs, proc = records
    bad = [f"{describe(r)}: {'; '.join(why)}" for r in recs for why in [problems(r, 90)] if why]
    assert not bad, "\n".join(bad) + "\n" + proc.stdout[-2000:]


def test_steady_state_loops_within_the_instruction_budget(records):
    """Per kernel, dtype, head_dim class and load path: the pinned and the best config at or below the
    budget, every other listed config within 1.25x of it (sass_report.budget_problems)."""
    if TRITON != BUDGET_TRITON:
        pytest.skip(f"the budget is set on Triton {BUDGET_TRITON}; {triton.__version__}'s counts are reported")
    recs, _ = records
    groups = {(r["kernel"], r["dtype"], r["block_d"], r["use_tma"]) for r in recs
              if r["kernel"] in ATTENTION and r["block_d"] <= 128}
    assert len(groups) == 3 * 2 * 2 * 2, sorted(groups)  # kernels x dtypes x BLOCK_D 64, 128 x load paths
    over = budget_problems(recs)
    assert not over, "\n".join(over)


def test_the_budget_covers_what_the_issue_names(records):
    """Every kernel, both half-precision dtypes, head_dim 64/80/96/128/256, causal and not, packed and
    not, a static cache (seqused_k) and not, both load paths; the decode kernels' loops reported, with
    and without a static cache's key counts."""
    recs, _ = records
    for kernel in ATTENTION:
        for dtype in ("bf16", "fp16"):
            mine = [r for r in recs if r["kernel"] == kernel and r["dtype"] == dtype]
            covers = {tuple(c) for r in mine for c in r["covers"]}  # (head_dim, causal, packed)
            assert {(d, c, p) for d in (64, 80, 96, 128, 256) for c in (True, False) for p in (True, False)} <= covers
            static = {tuple(c) for r in mine for c in r["covers_seqused_k"]}  # (head_dim, causal)
            assert {(d, c) for d in (64, 80, 96, 128, 256) for c in (True, False)} <= static
            assert {r["use_tma"] for r in mine} == {True, False}, (kernel, dtype)
    assert any(r["kernel"] == "rotary" for r in recs)
    for kernel in ("attention decode", "attention decode merge"):
        assert {r["dtype"] for r in recs if r["kernel"] == kernel} == {"bf16", "fp16"}, kernel
    for dtype in ("bf16", "fp16"):  # the split kernel with and without seqused_k, at every head_dim class
        decode = [r for r in recs if r["kernel"] == "attention decode" and r["dtype"] == dtype]
        assert {(r["block_d"], r["causal"], r["has_used"]) for r in decode} == {
            (d, c, u) for d in (64, 128, 256) for c in (True, False) for u in (True, False)}
    assert all(r["sass"]["steady_state"] for r in recs if r["kernel"] == "attention decode")


def test_a_new_sequence_length_compiles_no_new_kernel():
    """Autotune keys and specialization exclude lengths (and the strides and descriptor shapes that
    follow them)."""
    if not (TOOLS / "ptxas").exists():
        pytest.skip("Triton's bundled ptxas is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_check.py"), "--lengths"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"new kernels per length: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"

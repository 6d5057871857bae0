"""The benchmark harness end to end on a CPU (tiny sizes, PyTorch paths vs eager).

``python -m benchmarks.run --cpu-smoke --out <tmp>`` (called in-process: the same ``main``) must
write one JSON with provenance and every raw timing, a Markdown table and PNG plots, mark the
timings as CPU (not kernel performance), and keep going when one measurement fails.
"""

import json
import pathlib
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a top-level directory of the repository, not installed
    sys.path.insert(0, str(REPO))

from benchmarks import analysis, providers, registry, report, run  # noqa: E402

STATUSES = {"ok", "oom", "error", "unavailable", "skipped"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")  # the PyTorch path: the interpreter would only add minutes
        assert run.main(["--cpu-smoke", "--out", str(out)]) == 0
    files = list(out.glob("*.json"))
    assert len(files) == 1, files
    return files[0], json.loads(files[0].read_text())


def test_json_schema_and_provenance(smoke):
    path, data = smoke
    assert path.name.startswith("cpu_")
    assert data["schema"] == analysis.SCHEMA
    meta = data["meta"]
    for key in ("date", "git_commit", "source_sha256_16", "torch", "triton", "python", "device_name"):
        assert key in meta, key
    assert meta["device_type"] == "cpu" and meta["cpu_timings"] is True and "NOT kernel performance" in meta["cpu_note"]
    assert data["run"]["mode"] == "cpu-smoke" and data["run"]["complete"] is True
    assert data["copy_bandwidth"]["gbps"] > 0
    assert set(data["providers"]) == set(registry.PROVIDERS)


def test_every_row_recorded(smoke):
    _, data = smoke
    rows = data["results"]
    planned = {(c.id, p) for c, p, _ in run.planned_pairs("cpu-smoke", run.parse_args(["--cpu-smoke"]))}
    assert {(r["case_id"], r["provider"]) for r in rows} == planned
    for r in rows:
        assert r["status"] in STATUSES, r
        assert r["cpu_timing"] is True
        if r["status"] == "ok":
            assert 0 < r["ms_p20"] <= r["ms_median"] <= r["ms_p80"], r
            assert r["times_ms"] and r["n_reps"] == len(r["times_ms"])
            assert r["timer"].startswith("time.perf_counter")
        else:
            assert r["error"], r
    ok = {(r["op"], r["provider"], r["dtype"], r["mode"]) for r in rows if r["status"] == "ok"}
    for op in ("rotary", "attention"):
        for dtype, mode in (("bf16", "fwd"), ("fp16", "fwd+bwd")):
            assert (op, "ours", dtype, mode) in ok and (op, registry.BASELINE[op], dtype, mode) in ok
    assert ("decode", "ours", "bf16", "fwd") in ok and ("prefill", "hf_sdpa", "bf16", "fwd") in ok
    assert any(p in ("compile_hf", "compile_sdpa") for _, p, _, _ in ok)
    # Packages absent here are recorded with the reason, not dropped.
    for r in rows:
        if r["provider"] == "liger" and providers.available("liger"):
            assert r["status"] == "unavailable" and "not installed" in r["error"]


def test_derived_numbers_and_targets(smoke):
    _, data = smoke
    for r in data["results"]:
        if r["status"] == "ok" and r["provider"] == "ours" and r["op"] in ("attention", "rotary"):
            assert r["speedup"] is not None and r["baseline"] == registry.BASELINE[r["op"]]
            assert (r["tflops"] if r["op"] == "attention" else r["gbps"]) > 0
    assert len(data["targets"]) == len(registry.targets())
    assert all(t["status"] == "not applicable" and t["met"] is None for t in data["targets"])


def test_table_plots_and_readme(smoke, capsys):
    path, _ = smoke
    md = path.with_suffix(".md").read_text()
    assert "## Targets" in md and "not kernel performance" in md and "| ours |" in md
    pngs = list(path.parent.glob(f"{path.stem}_*.png"))
    assert {p.name.split(path.stem + "_")[1].rsplit("_", 2)[0] for p in pngs} >= {"rotary_seq", "attn_seq", "decode"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert report.main(["--readme", str(path)]) == 0
    table = capsys.readouterr().out
    assert path.name in table and "not kernel performance" in table and "| Target |" in table


def test_failures_are_recorded_and_the_run_goes_on(monkeypatch, tmp_path):
    """An OOM, a kernel error and a missing package each become one row; nothing raises."""
    def broken(provider, case, device):
        if provider == "ours":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64 GiB")
        if provider == "ours_norope":
            raise RuntimeError("longrope_triton: the attention forward kernel failed to compile: boom")
        raise providers.Unavailable("some_package is not installed")

    monkeypatch.setattr(providers, "build", broken)
    args = run.parse_args(["--cpu-smoke", "--out", str(tmp_path)])
    data = {"results": [], "run": {}}
    runner = run.Runner(args, data, tmp_path / "x.json", "cpu", "cpu-smoke")
    small = registry.Case("attention", "fwd", "bf16", 1, 2, 1, 16, 16, 32)
    bigger = registry.Case("attention", "fwd", "bf16", 1, 2, 1, 32, 32, 32)
    runner.run([(small, p, ("attn_seq",)) for p in ("ours", "ours_norope", "eager_sdpa_cudnn")]
               + [(bigger, "ours", ("attn_seq",))])
    status = {(r["case_id"], r["provider"]): (r["status"], r["error"]) for r in data["results"]}
    assert status[(small.id, "ours")][0] == "oom"
    assert status[(small.id, "ours_norope")] == ("error", "RuntimeError: longrope_triton: the attention forward "
                                                          "kernel failed to compile: boom")
    assert status[(small.id, "eager_sdpa_cudnn")] == ("unavailable", "some_package is not installed")
    assert status[(bigger.id, "ours")][0] == "skipped"  # larger than a case that ran out of memory
    assert data["run"]["complete"] is True  # nothing left for --resume
    assert json.loads((tmp_path / "x.json").read_text())["results"] == data["results"]


def _row(case, provider, ms, peak=None):
    row = run._new_row(case, provider, ("attn_seq",))
    row.update(status="ok", ms_median=ms, ms_p20=ms * 0.99, ms_p80=ms * 1.01, peak_mb=peak, cpu_timing=False)
    return row


def test_targets_on_gpu_shaped_results():
    """met / not met / not measured, computed from the rows of a (synthetic) H100 run."""
    t = {x.name: x for x in registry.targets()}
    rotary, fwd, mem = (t["rotary_bandwidth"].case, t["attn_fwd_vs_sdpa_B4x4K"].case, t["attn_memory_32K"].case)
    meta = {"device_type": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "date": "2026-01-01T00:00:00+00:00",
            "torch": "2.11", "triton": "3.6", "git_commit": "abc"}
    data = {"schema": analysis.SCHEMA, "meta": meta,
            "copy_bandwidth": {"gbps": 3000.0},
            "results": [_row(rotary, "ours", 0.2), _row(rotary, "eager_hf", 1.2),
                        _row(fwd, "ours", 2.0), _row(fwd, "eager_sdpa_flash", 2.5), _row(fwd, "ours_norope", 1.95),
                        _row(mem, "ours", 50.0, peak=1000.0), _row(mem, "eager_sdpa_flash", 40.0, peak=1500.0)]}
    got = {x["name"]: x for x in analysis.finalize(data)["targets"]}
    assert registry.bytes_moved(rotary) == 2 * 16384 * 64 * 128 * 2
    assert got["rotary_bandwidth"]["status"] == "met" and abs(got["rotary_bandwidth"]["value"] - 0.8948) < 1e-3
    assert got["rotary_vs_eager"]["status"] == "met" and got["rotary_vs_eager"]["value"] == pytest.approx(6.0)
    assert got["attn_fwd_vs_sdpa_B4x4K"]["status"] == "not met" and got["attn_fwd_vs_sdpa_B4x4K"]["met"] is False
    assert got["attn_fwd_vs_norope_B4x4K"]["status"] == "met"
    assert got["attn_memory_32K"]["status"] == "met" and got["attn_memory_32K"]["value"] == pytest.approx(2 / 3)
    assert got["attn_fwdbwd_vs_sdpa_B1x16K"]["status"] == "not measured"
    tflops = next(r["tflops"] for r in data["results"] if r["case_id"] == fwd.id and r["provider"] == "ours")
    assert tflops == pytest.approx(4 * 4 * 32 * 4096 * 4096 * 128 / 2 / 2e-3 / 1e12)
    table = report.readme_table(data, "benchmarks/results/x.json")
    assert "| not met |" in table and "[`x.json`](benchmarks/results/x.json) `" + fwd.id in table

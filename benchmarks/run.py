"""One command for every benchmark: ``python -m benchmarks.run [--quick | --cpu-smoke] [--out DIR]``.

Writes ``<out>/<device>_<UTC date-time>.json`` (rewritten after every measurement, so a run cut
short keeps what it measured), then renders ``<same name>.md`` and PNG plots next to it.
Each (case, provider) runs in isolation: an OOM, a kernel error or an unavailable package is
recorded in its row and the run goes on. A sticky CUDA error (the context is gone) restarts the
process on the same JSON (``--resume``), which skips what is already recorded.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import sys
import time
import traceback

import torch

from . import analysis, e2e, measure, providers, registry

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
OOM_ERRORS = providers.OOM_ERRORS
SETTINGS = {  # do_bench warm-up / repetition time (ms), prefill repetitions
    "full": {"warmup_ms": 25, "rep_ms": 100, "prefill_reps": 5, "max_minutes": None},
    "quick": {"warmup_ms": 10, "rep_ms": 40, "prefill_reps": 3, "max_minutes": 5.5},
    "cpu-smoke": {"warmup_ms": 1, "rep_ms": 5, "prefill_reps": 2, "max_minutes": None},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="short GPU run (~6 min): target cases first")
    size.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks the harness only")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR, help="output directory (default: %(default)s)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop starting new measurements after this many minutes (quick: 5.5); the rest is "
                        "recorded as skipped and a later --resume measures it")
    p.add_argument("--resume", type=pathlib.Path, help="continue this JSON: redo only rows not yet measured")
    p.add_argument("--only", default="", help="comma-separated substrings: keep cases whose id contains one")
    p.add_argument("--providers", default="", help="comma-separated provider names to keep")
    p.add_argument("--no-e2e", action="store_true", help="skip the model prefill cases")
    p.add_argument("--no-report", action="store_true", help="write the JSON only (no Markdown / plots)")
    p.add_argument("--git-commit", default=None, help="commit to record when the tree has no .git")
    p.add_argument("--list", action="store_true", help="print the planned (case, provider) pairs and exit")
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # kept across a restart
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def _mode(args, resumed: dict | None) -> str:
    if resumed is not None and not (args.quick or args.cpu_smoke):
        return resumed["run"]["mode"]
    return "quick" if args.quick else "cpu-smoke" if args.cpu_smoke else "full"


def planned_pairs(mode: str, args) -> list:
    """[(case, provider, families)] in run order, baseline provider first within a case."""
    only = [s for s in args.only.split(",") if s]
    keep = {s for s in args.providers.split(",") if s}
    pairs = []
    for item in registry.PLANS[mode]():
        case = item.case
        if only and not any(s in case.id for s in only):
            continue
        if args.no_e2e and case.op == "prefill":
            continue
        base = registry.BASELINE[case.op]
        ordered = sorted(item.providers, key=lambda p: p != base)
        pairs += [(case, p, item.families) for p in ordered if not keep or p in keep]
    return pairs


def _new_row(case, provider, families) -> dict:
    return {"case_id": case.id, "op": case.op, "mode": case.mode, "dtype": case.dtype, "shape": case.shape(),
            "families": list(families), "provider": provider, "status": None, "error": None, "notes": [],
            "flops": registry.flops(case), "bytes": registry.bytes_moved(case)}


def _autotuned_tiles() -> dict:
    """The tile config autotuning picked for each attention kernel, by autotune key (BLOCK_D, load
    path, dtypes): what the timings of the fused providers ran."""
    from longrope_triton import attention
    return {name: {str(key): str(config) for key, config in tuned.cache.items()}
            for name, tuned in (("forward", attention._fwd_tuned), ("dK/dV", attention._dkdv_tuned),
                                ("dQ", attention._dq_tuned))}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:500]


class Runner:
    def __init__(self, args, data: dict, path: pathlib.Path, device: str, mode: str):
        self.args, self.data, self.path, self.device, self.mode = args, data, path, device, mode
        self.settings = SETTINGS[mode]
        self.oom: dict = {}  # (provider, op, mode, dtype, heads, dim, causal) -> (tokens, B*Sk^2) of an OOM
        self.start = time.monotonic()

    # ------------------------------------------------------------------ persistence
    def save(self):
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def record(self, row: dict):
        rows = self.data["results"]
        for i, old in enumerate(rows):
            if (old["case_id"], old["provider"]) == (row["case_id"], row["provider"]):
                rows[i] = row
                break
        else:
            rows.append(row)
        self.save()

    # ------------------------------------------------------------------ one measurement
    def _oom_key(self, case, provider):
        return (provider, case.op, case.mode, case.dtype, case.q_heads, case.kv_heads, case.head_dim, case.causal)

    def _skip_after_oom(self, case, provider):
        smaller = self.oom.get(self._oom_key(case, provider))
        if smaller and case.batch * case.seq_k >= smaller[0] and case.batch * case.seq_k ** 2 >= smaller[1]:
            return f"skipped: {provider} ran out of memory on a smaller case of this sweep"
        return None

    def measure(self, case, provider, families) -> dict:
        row = _new_row(case, provider, families)
        row["cpu_timing"] = self.device == "cpu"
        t0 = time.monotonic()
        reason = self._skip_after_oom(case, provider)
        if reason:
            row.update(status="skipped", skip="after_oom", error=reason)
            return row
        runnable = fn = None
        try:
            if case.op == "prefill":
                fn, notes = e2e.build(provider, case, self.device)
                fn()  # warm-up: autotuning / compilation of the patched kernels
                row.update(measure.peak_memory(fn, [], self.device))
                row.update(e2e.time_fixed(fn, self.device, self.settings["prefill_reps"]))
            elif case.op == "decode_step":
                fn, notes = e2e.build_step(provider, case, self.device)
                fn()  # warm-up: autotuning / compilation
                row.update(measure.peak_memory(fn, [], self.device))
                row.update(measure.bench(fn, [], self.device, self.settings["warmup_ms"], self.settings["rep_ms"]))
            else:
                runnable = providers.build(provider, case, self.device)
                fn, notes = runnable.fn, runnable.notes
                fn()  # warm-up: Triton autotuning, torch.compile
                if self.device == "cuda":
                    torch.cuda.synchronize()
                row.update(measure.peak_memory(fn, runnable.grad_to_none, self.device))
                row.update(measure.bench(fn, runnable.grad_to_none, self.device, self.settings["warmup_ms"],
                                         self.settings["rep_ms"]))
            row.update(status="ok", notes=notes)
            if provider.startswith("ours"):
                row["autotuned_tiles"] = _autotuned_tiles()
        except providers.Unavailable as exc:
            row.update(status="unavailable", error=str(exc)[:500])
        except OOM_ERRORS as exc:
            row.update(status="oom", error=_first_line(exc))
            self.oom[self._oom_key(case, provider)] = (case.batch * case.seq_k, case.batch * case.seq_k ** 2)
        except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
            row.update(status="error", error=_first_line(exc),
                       traceback=traceback.format_exc(limit=-4).splitlines()[-12:])
        finally:
            runnable = fn = None  # noqa: F841 - free the inputs before the next case
            if self.device == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
        row["wall_s"] = round(time.monotonic() - t0, 3)
        return row

    # ------------------------------------------------------------------ the loop
    def deadline(self):
        if self.args.deadline:
            return self.args.deadline
        minutes = self.args.max_minutes if self.args.max_minutes is not None else self.settings["max_minutes"]
        return None if minutes is None else time.time() + 60 * minutes

    def run(self, pairs):
        done = {(r["case_id"], r["provider"]) for r in self.data["results"] if analysis.is_done(r)}
        todo = [p for p in pairs if (p[0].id, p[1]) not in done]
        deadline = self.deadline()
        self.data["run"]["deadline_unix"] = deadline
        print(f"{len(todo)} measurements to run ({len(pairs) - len(todo)} already in {self.path.name})", flush=True)
        for n, (case, provider, families) in enumerate(todo, 1):
            if deadline is not None and time.time() > deadline:
                row = _new_row(case, provider, families)
                row.update(status="skipped", skip="budget",
                           error="time budget (--max-minutes) reached; --resume measures it")
                self.record(row)
                continue
            row = self.measure(case, provider, families)
            self.record(row)
            print(self._progress(n, len(todo), row), flush=True)
            if self.device == "cuda" and row["status"] == "error" and not measure.cuda_context_ok():
                self._restart(deadline)
        missing = sum(1 for r in self.data["results"] if not analysis.is_done(r))
        self.data["run"]["complete"] = missing == 0
        if missing:
            print(f"{missing} measurements skipped by the time budget; continue with "
                  f"`python -m benchmarks.run --resume {self.path}`", flush=True)

    def _restart(self, deadline):
        print("the CUDA context is broken; restarting the process on the same JSON", flush=True)
        self.save()
        argv = list(self.args.argv)
        for flag in ("--resume", "--deadline"):
            if flag in argv:
                i = argv.index(flag)
                del argv[i:i + 2]
        argv += ["--resume", str(self.path)] + (["--deadline", str(deadline)] if deadline else [])
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.run", *argv])

    def _progress(self, n, total, row) -> str:
        head = f"[{time.monotonic() - self.start:7.1f}s] {n:>3}/{total} {row['case_id']:<52} {row['provider']:<21}"
        if row["status"] != "ok":
            return f"{head} {row['status'].upper()}: {row['error']}"
        analysis.derive(self.data)
        parts = [f"{row['ms_median']:9.4f} ms [{row['ms_p20']:.4f}-{row['ms_p80']:.4f}]"]
        if row.get("tflops"):
            parts.append(f"{row['tflops']:7.1f} TFLOP/s")
        if row.get("gbps"):
            parts.append(f"{row['gbps']:7.1f} GB/s" + (f" ({100 * row['copy_bw_fraction']:.0f}% copy)"
                                                       if row.get("copy_bw_fraction") else ""))
        if row.get("speedup") and row["provider"] != row.get("baseline"):
            parts.append(f"x{row['speedup']:.2f} vs {row['baseline']}")
        if row.get("peak_mb") is not None:
            parts.append(f"peak {row['peak_mb']:.0f} MB")
        return f"{head} {'  '.join(parts)}  ({row['wall_s']:.1f}s)"


def _provider_table(device) -> dict:
    out = {}
    for name, p in registry.PROVIDERS.items():
        reason = providers.available(name)
        out[name] = {"description": p.description, "rope": p.rope, "ops": list(p.ops), "available": reason is None,
                     "reason": reason}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    resumed = json.loads(args.resume.read_text()) if args.resume else None
    mode = _mode(args, resumed)
    pairs = planned_pairs(mode, args)
    if args.list:
        for case, provider, families in pairs:
            print(f"{case.id:<60} {provider:<22} {','.join(families)}")
        print(f"{len(pairs)} measurements ({mode})")
        return 0
    device = "cpu" if mode == "cpu-smoke" else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --cpu-smoke for the CPU harness check", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # shared CI cores: one thread times far more steadily
    try:
        return _run(args, resumed, mode, pairs, device)
    finally:
        torch.set_num_threads(threads)


def _run(args, resumed, mode, pairs, device) -> int:
    if resumed is not None:
        data, path = resumed, args.resume
    else:
        meta = measure.provenance(device, args.git_commit)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{measure.device_slug(meta)}_{stamp}.json"
        settings = dict(SETTINGS[mode], compile=providers.compile_settings(device),
                        triton_interpret=os.environ.get("TRITON_INTERPRET", "0"))
        data = {"schema": analysis.SCHEMA, "meta": meta,
                "run": {"mode": mode, "settings": settings, "started": meta["date"], "complete": False},
                "providers": _provider_table(device), "copy_bandwidth": None, "results": [], "targets": []}
    runner = Runner(args, data, path, device, mode)
    print(f"benchmarks ({mode}) on {data['meta']['device_name']}: {path}", flush=True)
    if data.get("meta", {}).get("cpu_timings"):
        print("CPU run: timings check the harness only; they are not kernel performance", flush=True)
    if not data.get("copy_bandwidth"):
        data["copy_bandwidth"] = measure.copy_bandwidth(device, SETTINGS[mode]["warmup_ms"], SETTINGS[mode]["rep_ms"])
        print(f"copy bandwidth: {data['copy_bandwidth']['gbps']:.1f} GB/s", flush=True)
    runner.run(pairs)
    e2e.release_models()
    data["run"]["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    analysis.finalize(data)
    runner.save()
    print(f"results: {path}", flush=True)
    for t in data["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        print(f"  target {t['name']:<28} {t['status']:<15} {value} ({t['comparison']} {t['threshold']})", flush=True)
    if not args.no_report:
        from . import report

        for written in report.render(data, path, path.parent):
            print(f"wrote {written}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

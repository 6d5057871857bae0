"""Markdown tables and PNG plots from any results JSON; the README table with ``--readme``.

    python -m benchmarks.report                      # latest JSON in benchmarks/results/
    python -m benchmarks.report RUN.json --out DIR   # re-render one run
    python -m benchmarks.report --readme [RUN.json]  # print the README table (cites the JSON)

Derived numbers (throughput, ratios, targets) are recomputed from the raw rows every time.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections import defaultdict

from . import analysis, registry
from .measure import REPO

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
CPU_WARNING = ("**CPU run: these timings check that the harness works. They are PyTorch paths on a "
               "shared CPU and are not kernel performance.**")
SECTIONS = {
    "rotary": ("Rotary alone", "GB/s = (q, k read + written) bytes / median time; % copy = of the copy bandwidth "
               "measured in the same run."),
    "attention": ("Attention (prefill)", "TFLOP/s from 4·B·Hq·Sq·Sk·D, halved when causal, backward 2.5x; "
                  "vs no-RoPE = time of ours_norope / time of this provider."),
    "decode": ("Decode (Sq = 1 against a rotated KV cache)", "Ours runs with k_is_rotated=True; the eager path "
               "rotates q only."),
    "prefill": ("Model prefill", "One forward of the whole prompt, use_cache=False, logits of the last token only."),
    "decode_step": ("Model decode step", "One token of a patched model against a StaticCache (filled but for the "
                    "slot the step writes): eager, model.forward compiled with fullgraph=True, and captured once "
                    "in a CUDA graph and replayed."),
}


def load(path) -> dict:
    data = json.loads(pathlib.Path(path).read_text())
    if data.get("schema") != analysis.SCHEMA:
        raise ValueError(f"{path}: not a benchmarks results file (schema {data.get('schema')!r})")
    return analysis.finalize(data)


def latest(results_dir=RESULTS_DIR) -> pathlib.Path:
    """The newest JSON by its recorded date; a GPU run wins over a CPU smoke run."""
    files = sorted(pathlib.Path(results_dir).glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no results JSON in {results_dir}; run `python -m benchmarks.run` first")

    def key(f):
        try:
            meta = json.loads(f.read_text()).get("meta", {})
        except (OSError, ValueError):
            return (False, "")
        return (meta.get("device_type") == "cuda", meta.get("date", ""))

    return max(files, key=key)


def cite(path) -> str:
    path = pathlib.Path(path).resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return path.name


# ---------------------------------------------------------------------------- formatting
def _num(x, digits=4):
    if x is None:
        return "–"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def _ms(r):
    return f"{_num(r['ms_median'])} ({_num(r['ms_p20'], 3)}–{_num(r['ms_p80'], 3)})"


def _ratio(x):
    return "–" if x is None else f"{x:.2f}x"


def _pct(x):
    return "–" if x is None else f"{100 * x:.0f} %"


def _table(header, rows) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _case_label(r) -> str:
    s = r["shape"]
    if r["op"] == "prefill":
        return f"{s['model']} S{s['seq_q']}"
    if r["op"] == "decode_step":
        return f"{s['model']} B{s['batch']} cache {s['seq_k']}"
    seq = f"S{s['seq_q']}" if s["seq_q"] == s["seq_k"] else f"Sq{s['seq_q']} Sk{s['seq_k']}"
    mask = "" if r["op"] == "rotary" else (" causal" if s["causal"] else " full")
    return f"B{s['batch']} H{s['q_heads']}/{s['kv_heads']} {seq} D{s['head_dim']}{mask}"


def _provider_order(name):
    names = list(registry.PROVIDERS)
    return names.index(name) if name in names else len(names)


def _header_lines(data, source) -> list:
    m, run = data["meta"], data["run"]
    commit = (m.get("git_commit") or "unknown")[:12] + (" (uncommitted changes)" if m.get("git_dirty") else "")
    lines = [f"- Source: `{source}` ({m['date']}), commit {commit}, library sources sha256 {m['source_sha256_16']}",
             f"- Device: {m['device_name']}"]
    if m["device_type"] == "cuda":
        lines[-1] += (f" (sm {m.get('compute_capability')}, {m.get('device_memory_gib')} GiB), driver "
                      f"{m.get('driver')}, CUDA {m.get('cuda_runtime')}, cuDNN {m.get('cudnn')}")
    lines.append(f"- torch {m['torch']}, triton {m['triton']}, transformers {m.get('transformers')}, "
                 f"Python {m['python']}")
    s = run["settings"]
    lines.append(f"- Mode `{run['mode']}`: warm-up {s['warmup_ms']} ms, repetitions {s['rep_ms']} ms per "
                 f"measurement; torch.compile backend {s['compile']['backend']}; "
                 f"{'complete' if run.get('complete') else 'INCOMPLETE (some rows skipped)'}")
    cb = data.get("copy_bandwidth") or {}
    if cb:
        lines.append(f"- Copy bandwidth (same run): {cb['gbps']:.1f} GB/s ({cb['method']})")
    return lines


def _targets_table(data, source=None) -> list:
    rows = []
    for t in data["targets"]:
        fmt = _pct if t["metric"] in ("copy_bw_fraction", "vs_norope") else _ratio
        value = fmt(t["value"])
        goal = f"{t['comparison']} {fmt(t['threshold'])}"
        status = t["status"] + (f" ({t['reason']})" if t.get("reason") and t["status"] != "not applicable" else "")
        where = f"`{t['case_id']}`" + (f" in [`{pathlib.Path(source).name}`]({source})" if source else "")
        rows.append([t["description"], value, goal, status, where])
    return _table(["Target", "Measured", "Goal", "Status", "Case"], rows)


# ---------------------------------------------------------------------------- full report
def markdown(data: dict, source: str) -> str:
    cpu = data["meta"]["device_type"] != "cuda"
    out = [f"# Benchmarks: {data['meta']['device_name']}", ""] + _header_lines(data, source) + [""]
    if cpu:
        out += [CPU_WARNING, ""]
    out += ["## Targets", ""] + _targets_table(data) + [""]
    counts = defaultdict(lambda: [0, 0])
    for r in data["results"]:
        counts[r["provider"]][0] += r["status"] == "ok"
        counts[r["provider"]][1] += 1
    out += ["## Providers", ""] + _table(
        ["Provider", "RoPE", "Measured", "What it runs"],
        [[f"`{n}`", p["rope"], f"{counts[n][0]}/{counts[n][1]} rows" if p["available"] else f"no: {p['reason']}",
          p["description"]] for n, p in data["providers"].items()]) + [""]
    ok = [r for r in data["results"] if r["status"] == "ok"]
    for op, (title, legend) in SECTIONS.items():
        rows = [r for r in ok if r["op"] == op]
        if not rows:
            continue
        out += [f"## {title}", "", legend + (" " + CPU_WARNING if cpu else ""), ""]
        groups = defaultdict(list)
        for r in rows:
            groups[(r["dtype"], r["mode"])].append(r)
        for (dtype, mode), group in sorted(groups.items()):
            group.sort(key=lambda r: (r["shape"]["seq_k"] * r["shape"]["batch"], r["case_id"],
                                      _provider_order(r["provider"])))
            base = registry.BASELINE[op]
            if op == "rotary":
                header = ["Case", "Provider", "ms (p20–p80)", "GB/s", "% copy BW", "Peak MB", f"x {base}"]
                body = [[_case_label(r), r["provider"], _ms(r), _num(r["gbps"]), _pct(r["copy_bw_fraction"]),
                         _num(r.get("peak_mb")), _ratio(r["speedup"])] for r in group]
            elif op in ("prefill", "decode_step"):
                header = ["Case", "Provider", "ms (p20–p80)", "Peak MB", f"x {base}", "Peak / stock"]
                body = [[_case_label(r), r["provider"], _ms(r), _num(r.get("peak_mb")), _ratio(r["speedup"]),
                         _ratio(r["peak_ratio"])] for r in group]
            else:
                header = ["Case", "Provider", "ms (p20–p80)", "TFLOP/s", "Peak MB", f"x {base}", "Peak / base",
                          "vs no-RoPE"]
                body = [[_case_label(r), r["provider"], _ms(r), _num(r["tflops"]), _num(r.get("peak_mb")),
                         _ratio(r["speedup"]), _ratio(r["peak_ratio"]), _pct(r["vs_norope"])] for r in group]
            out += [f"### {dtype}, {mode}", ""] + _table(header, body) + [""]
    failed = defaultdict(list)
    for r in data["results"]:
        if r["status"] != "ok":
            failed[(r["provider"], r["status"], r.get("error") or "")].append(r["case_id"])
    if failed:
        out += ["## Not measured", ""] + _table(
            ["Provider", "Status", "Reason", "Cases"],
            [[p, s, e.replace("|", "/"), f"{len(c)}: `{c[0]}`" + (" …" if len(c) > 1 else "")]
             for (p, s, e), c in sorted(failed.items())]) + [""]
    return "\n".join(out)


# ---------------------------------------------------------------------------- plots
PLOT_FAMILIES = ("rotary_seq", "attn_seq", "decode", "prefill")
X_LABELS = {"rotary_seq": "sequence length (batch 1)", "attn_seq": "sequence length (batch x seq = 16K up to 16K, "
            "then batch 1)", "decode": "KV cache length (one query token)", "prefill": "prompt tokens"}


def _seq_label(x, _pos=None) -> str:
    return f"{x / 1024:g}K" if x >= 1024 else f"{x:g}"


def plots(data: dict, stem: str, out_dir) -> list:
    """One PNG per (sweep, dtype, mode): median time and peak memory vs sequence length per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    cpu = data["meta"]["device_type"] != "cuda"
    groups = defaultdict(list)
    for r in data["results"]:
        if r["status"] == "ok":
            for fam in r["families"]:
                if fam in PLOT_FAMILIES:
                    groups[(fam, r["dtype"], r["mode"])].append(r)
    written = []
    for (fam, dtype, mode), rows in sorted(groups.items()):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
        for provider in sorted({r["provider"] for r in rows}, key=_provider_order):
            pts = sorted((r["shape"]["seq_k"], r["ms_median"], r.get("peak_mb")) for r in rows
                         if r["provider"] == provider)
            xs = [p[0] for p in pts]
            ax_t.plot(xs, [p[1] for p in pts], marker="o", label=provider)
            mem = [(x, m) for x, _, m in pts if m is not None]
            if mem:
                ax_m.plot([x for x, _ in mem], [m for _, m in mem], marker="o", label=provider)
        for ax, label in ((ax_t, "median time (ms)"), (ax_m, "peak memory (MB)")):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(_seq_label))
            ax.set_yscale("log")
            ax.set_xlabel(X_LABELS[fam])
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        if cpu:
            ax_m.text(0.5, 0.5, "no peak memory on CPU", ha="center", va="center", transform=ax_m.transAxes)
        ax_t.legend(fontsize=8)
        note = " — CPU: harness check, NOT kernel performance" if cpu else ""
        fig.suptitle(f"{fam} {dtype} {mode} on {data['meta']['device_name']}{note}", fontsize=10)
        fig.tight_layout()
        path = pathlib.Path(out_dir) / f"{stem}_{fam}_{dtype}_{mode.replace('+', '')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def render(data: dict, json_path, out_dir) -> list:
    """Write <stem>.md and the PNGs into out_dir; returns their paths."""
    json_path, out_dir = pathlib.Path(json_path), pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{json_path.stem}.md"
    md.write_text(markdown(data, cite(json_path)) + "\n")
    return [md] + plots(data, json_path.stem, out_dir)


# ---------------------------------------------------------------------------- README
def readme_table(data: dict, source: str) -> str:
    """Targets and headline cases, every row naming the JSON file and case it comes from."""
    m = data["meta"]
    name = pathlib.Path(source).name
    link = f"[`{name}`]({source})"
    out = [f"Measured on {m['device_name']} ({m['date'][:10]}, commit {(m.get('git_commit') or 'unknown')[:10]}, "
           f"torch {m['torch']}, triton {m['triton']}); every number below is from {link}. "
           f"Regenerate with `python -m benchmarks.report --readme`.", ""]
    if m["device_type"] != "cuda":
        out += [CPU_WARNING, ""]
    out += _targets_table(data, source) + [""]
    rows = analysis.index(data)
    headline = []
    seen = set()
    for t in registry.targets():
        if t.case.id not in seen:
            seen.add(t.case.id)
            headline.append(t.case.id)
    if not any(c in seen for c, _ in rows):  # no target shape measured (a CPU smoke run): every case
        headline = sorted({r["case_id"] for r in data["results"] if r["op"] in ("rotary", "attention")})
    headline += sorted({r["case_id"] for r in data["results"] if r["op"] in ("decode", "prefill", "decode_step")}
                       - seen)
    body = []
    for case_id in headline:
        present = [r for (c, _), r in rows.items() if c == case_id]
        if not present:
            continue
        op = present[0]["op"]
        ours_name = {"prefill": "hf_patched", "decode_step": "patched_cudagraph"}.get(op, "ours")
        base = registry.BASELINE[op]
        compiled = {"rotary": "compile_hf", "attention": "compile_sdpa", "decode": "compile_sdpa",
                    "decode_step": "patched_compiled"}.get(op)

        def ms(provider):
            r = rows.get((case_id, provider))
            return "–" if r is None or r["status"] != "ok" else _num(r["ms_median"])

        ours = rows.get((case_id, ours_name))
        ok = ours is not None and ours["status"] == "ok"
        body.append([f"{op} {present[0]['mode']} {present[0]['dtype']}", _case_label(present[0]), ms(ours_name),
                     f"{ms(base)} ({base})", ms(compiled) if compiled else "–",
                     ms("ours_norope") if op in ("attention", "decode") else "–",
                     _ratio(ours["speedup"]) if ok else "–",
                     _ratio(ours["peak_ratio"]) if ok else "–", f"{link} `{case_id}`"])
    out += _table(["Operation", "Shape", "ours ms", "eager ms", "torch.compile ms", "no-RoPE ms", "speed-up",
                   "peak mem vs eager", "Source"], body)
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="?", type=pathlib.Path, help="results JSON (default: the latest in %s)" % RESULTS_DIR)
    p.add_argument("--out", type=pathlib.Path, default=None, help="output directory (default: beside the JSON)")
    p.add_argument("--readme", action="store_true", help="print the README results table and exit")
    args = p.parse_args(argv)
    path = args.json or latest()
    data = load(path)
    if args.readme:
        print(readme_table(data, cite(path)))
        return 0
    for written in render(data, path, args.out or path.parent):
        print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

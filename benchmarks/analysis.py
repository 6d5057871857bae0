"""Derived numbers of a results JSON: throughput, ratios against the same run's baselines, targets.

Pure functions of the JSON dict, so ``report.py`` can recompute them from any file.
"""

from __future__ import annotations

from .registry import BASELINE, targets

SCHEMA = "longrope_triton.benchmarks/1"
DONE = ("ok", "oom", "error", "unavailable")  # statuses that a resumed run does not redo


def is_done(row: dict) -> bool:
    """Measured, failed for good, or skipped because a smaller case ran out of memory."""
    return row["status"] in DONE or row.get("skip") == "after_oom"


def index(data: dict) -> dict:
    return {(r["case_id"], r["provider"]): r for r in data["results"]}


def derive(data: dict) -> dict:
    """Fill tflops, gbps, copy_bw_fraction, speedup, peak_ratio and vs_norope in every row (in place)."""
    rows = index(data)
    copy_gbps = (data.get("copy_bandwidth") or {}).get("gbps")
    for r in data["results"]:
        for key in ("tflops", "gbps", "copy_bw_fraction", "speedup", "peak_ratio", "vs_norope"):
            r[key] = None
        r["baseline"] = BASELINE.get(r["op"])
        if r["status"] != "ok" or not r.get("ms_median"):
            continue
        seconds = r["ms_median"] * 1e-3
        if r.get("flops"):
            r["tflops"] = r["flops"] / seconds / 1e12
        if r.get("bytes"):
            r["gbps"] = r["bytes"] / seconds / 1e9
            if copy_gbps:
                r["copy_bw_fraction"] = r["gbps"] / copy_gbps
        base = rows.get((r["case_id"], r["baseline"]))
        if base and base["status"] == "ok" and base.get("ms_median"):
            r["speedup"] = base["ms_median"] / r["ms_median"]
            if r.get("peak_mb") and base.get("peak_mb"):
                r["peak_ratio"] = r["peak_mb"] / base["peak_mb"]
        norope = rows.get((r["case_id"], "ours_norope"))
        if r["provider"].startswith("ours") and norope and norope["status"] == "ok" and norope.get("ms_median"):
            r["vs_norope"] = norope["ms_median"] / r["ms_median"]
    return data


def _missing_reason(rows, target, row) -> str:
    if row is None:
        return "case not measured in this run (not in its plan, or filtered)"
    if row["status"] != "ok":
        return f"{row['provider']}: {row['status']}" + (f" ({row['error']})" if row.get("error") else "")
    other = {"speedup": row.get("baseline"), "peak_ratio": row.get("baseline"), "vs_norope": "ours_norope"}
    ref = other.get(target.metric)
    ref_row = rows.get((target.case.id, ref)) if ref else None
    if ref and (ref_row is None or ref_row["status"] != "ok"):
        state = "not measured" if ref_row is None else ref_row["status"]
        return f"reference {ref}: {state}" + (f" ({ref_row['error']})" if ref_row and ref_row.get("error") else "")
    return "metric not available (no peak memory on CPU, or no copy bandwidth)"


def compute_targets(data: dict) -> list:
    """Each target of registry.targets() with the measured value and met / not met / not measured."""
    rows = index(data)
    meta = data["meta"]
    cpu = meta.get("device_type") != "cuda"
    out = []
    for t in targets():
        row = rows.get((t.case.id, t.provider))
        value = row.get(t.metric) if row and row["status"] == "ok" else None
        entry = {"name": t.name, "description": t.description, "case_id": t.case.id, "provider": t.provider,
                 "metric": t.metric, "threshold": t.threshold,
                 "comparison": ">=" if t.higher_is_better else "<=", "value": value, "met": None}
        if cpu:
            entry["status"] = "not applicable"
            entry["reason"] = "CPU run: timings are not kernel performance; targets are for H100 bf16"
        elif value is None:
            entry["status"] = "not measured"
            entry["reason"] = _missing_reason(rows, t, row)
        else:
            entry["met"] = value >= t.threshold if t.higher_is_better else value <= t.threshold
            entry["status"] = "met" if entry["met"] else "not met"
            if "H100" not in (meta.get("device_name") or ""):
                entry["reason"] = f"measured on {meta.get('device_name')}; the target is stated for H100"
        out.append(entry)
    return out


def finalize(data: dict) -> dict:
    derive(data)
    data["targets"] = compute_targets(data)
    return data

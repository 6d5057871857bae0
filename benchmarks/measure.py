"""Timing, peak memory, copy bandwidth and provenance.

GPU times come from ``triton.testing.do_bench`` (CUDA events, L2 flushed before every
repetition, gradients reset between repetitions); its raw per-repetition times are kept and
summarized exactly as do_bench's ``quantiles=[0.5, 0.2, 0.8]`` would. CPU times come from
``time.perf_counter`` and are a harness check only, never kernel performance.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import pathlib
import platform
import subprocess
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
QUANTILES = (0.5, 0.2, 0.8)
MAX_SAMPLES_KEPT = 500  # raw repetition times stored per result (evenly subsampled beyond)


def _quantiles(times: list) -> list:
    q = torch.tensor(QUANTILES, dtype=torch.float64)
    return torch.quantile(torch.tensor(times, dtype=torch.float64), q).tolist()


def _summary(times: list, timer: str) -> dict:
    median, p20, p80 = _quantiles(times)
    kept = times if len(times) <= MAX_SAMPLES_KEPT else [
        times[round(i * (len(times) - 1) / (MAX_SAMPLES_KEPT - 1))] for i in range(MAX_SAMPLES_KEPT)]
    return {"ms_median": median, "ms_p20": p20, "ms_p80": p80, "ms_iqr": p80 - p20, "n_reps": len(times),
            "timer": timer, "times_ms": [float(f"{t:.6g}") for t in kept]}


def bench(fn, grad_to_none, device, warmup_ms: float, rep_ms: float) -> dict:
    """Median / p20 / p80 time of ``fn`` in ms, plus the raw repetition times."""
    if torch.device(device).type == "cuda":
        import triton.testing

        try:
            times = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                            return_mode="all")
        except (AssertionError, TypeError):  # a Triton without return_mode="all": quantiles only
            median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                                       quantiles=list(QUANTILES))
            return {"ms_median": median, "ms_p20": p20, "ms_p80": p80, "ms_iqr": p80 - p20, "n_reps": None,
                    "timer": "triton.testing.do_bench", "times_ms": []}
        return _summary(list(times), "triton.testing.do_bench")
    return _summary(_cpu_times(fn, grad_to_none, warmup_ms, rep_ms), "time.perf_counter (CPU)")


def _cpu_times(fn, grad_to_none, warmup_ms, rep_ms, min_reps=3, max_reps=10) -> list:
    def once():
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    estimate = once()
    for _ in range(max(0, min(3, int(warmup_ms / max(estimate, 1e-3))) - 1)):
        once()
    n = max(min_reps, min(max_reps, int(rep_ms / max(estimate, 1e-3))))
    return [once() for _ in range(n)]


def peak_memory(fn, leaves, device) -> dict:
    """torch.cuda.max_memory_allocated over one iteration after a reset (inputs included), and the
    part above what was allocated before the call. None on CPU."""
    if torch.device(device).type != "cuda":
        return {"peak_mb": None, "peak_extra_mb": None}
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    for t in leaves:
        t.grad = None
    return {"peak_mb": peak / 2**20, "peak_extra_mb": (peak - before) / 2**20}


def copy_bandwidth(device, warmup_ms: float, rep_ms: float) -> dict:
    """Device copy bandwidth from a large tensor clone: (read + write) bytes / median time."""
    cuda = torch.device(device).type == "cuda"
    nbytes = 2**30 if cuda else 2**24
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    timing = bench(lambda: x.clone(), [], device, warmup_ms, rep_ms)
    gbps = 2 * nbytes / (timing["ms_median"] * 1e-3) / 1e9
    del x
    return {"gbps": gbps, "bytes": nbytes, "method": "tensor.clone() of a bf16 tensor, 2 x bytes / median time",
            **{k: timing[k] for k in ("ms_median", "ms_p20", "ms_p80", "timer")}}


def cuda_context_ok() -> bool:
    """False after a sticky CUDA error (illegal address...): the process must be replaced."""
    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").add_(1).item() == 2.0
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        return False


# ---------------------------------------------------------------------------- provenance
def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list, cwd=REPO):
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_hash() -> str:
    """sha256 over the library's Python sources: identifies the measured code even without .git."""
    h = hashlib.sha256()
    files = sorted(list((REPO / "longrope_triton").rglob("*.py")) + list((REPO / "kernels").glob("*.py")))
    for f in files:
        h.update(str(f.relative_to(REPO)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def provenance(device, git_commit=None) -> dict:
    import triton

    cuda = torch.device(device).type == "cuda"
    status = _run(["git", "status", "--porcelain", "--", "longrope_triton", "kernels", "benchmarks"])
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit or _run(["git", "rev-parse", "HEAD"]),
        "git_dirty": None if status is None else bool(status),
        "source_sha256_16": source_hash(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": _version("transformers"),
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "argv": sys.argv[1:],
        "device_type": "cuda" if cuda else "cpu",
    }
    if cuda:
        props = torch.cuda.get_device_properties(device)
        meta.update({
            "device_name": torch.cuda.get_device_name(device),
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "sm_count": props.multi_processor_count,
            "device_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], cwd=None),
            "cpu_timings": False,
        })
    else:
        meta.update({
            "device_name": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "cpu_timings": True,
            "cpu_note": "CPU run: a check that the harness works. The timings are of the PyTorch paths on a "
                        "shared CPU and are NOT kernel performance.",
        })
    return meta


def device_slug(meta: dict) -> str:
    name = meta["device_name"] if meta["device_type"] == "cuda" else "cpu"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")

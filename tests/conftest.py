"""Shared test fixtures and helpers.

- Every test starts from ``torch.manual_seed(0)`` (autouse fixture).
- ``@pytest.mark.gpu`` tests are skipped when no CUDA device is available.
- ``path`` (fixture) runs a test on the PyTorch path and, under TRITON_INTERPRET=1, on the
  Triton kernel in the interpreter.
- ``assert_parity`` compares a result against a float64 reference with a tolerance
  that means something for the dtype (STYLE.md "Tests"), and reports the RMS error
  ratio in the failure message.

Which path a CPU test exercises is decided by the environment, read by the library
at call time: with ``TRITON_INTERPRET=1`` fp16/fp32 CPU tensors run the Triton
kernels in Triton's interpreter, otherwise the PyTorch path. CI runs the suite in
interpreter mode; run the rotary tests both ways.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

# fp32 results: |actual - reference| <= FP32_REL_TOL * max(1, max |reference|). The
# split-position cos/sin tables are ~2e-7 off (DESIGN §2) and fp32 rounding of a
# rotated value adds ~1e-7 relative, so 2e-6 leaves 5x headroom and still rejects a
# naive fp32 angle (1e-4 .. 1e-2 off at the positions tested).
FP32_REL_TOL = 2e-6


# The newest releases the suite has passed with (README "Supported versions"). CI installs the
# newest of each; one newer than these is named at the top of the run, so that a failure it
# causes is attributed to the upstream release at once.
NEWEST_TESTED = {"torch": "2.13.0", "triton": "3.9.0", "transformers": "5.25.0"}


def _versions_note() -> tuple[str, bool]:
    """("longrope_triton against: torch X; ...", whether any is newer than the newest tested)."""
    import importlib.metadata

    from packaging.version import Version

    lines, any_newer = [], False
    for name, tested in NEWEST_TESTED.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        newer = Version(installed).release > Version(tested).release
        any_newer |= newer
        lines.append(f"{name} {installed}" + (f" (NEWER than the newest tested, {tested}: failures may be this "
                                             f"upstream release's doing)" if newer else ""))
    return "longrope_triton against: " + "; ".join(lines), any_newer


def pytest_report_header(config):
    return _versions_note()[0]


def pytest_terminal_summary(terminalreporter):
    note, any_newer = _versions_note()
    if any_newer:  # repeated at the end, where -q runs (CI) show it beside the failures
        terminalreporter.write_line(note, yellow=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def torch_path_quiet(monkeypatch):
    """The Hugging Face tests' default (``pytest.mark.usefixtures("torch_path_quiet")``): the PyTorch
    path (the integration logic is the same on both paths and the interpreter is slow; the ``path``
    fixture or a test switches to the kernel), and transformers' deprecation chatter silenced."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def interpreter_mode() -> bool:
    """True when CPU tensors run the Triton kernels in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Read once, at collection: a test module's autouse fixture may switch the flag off per test.
INTERPRETED = interpreter_mode()


@pytest.fixture(params=["torch", "kernel"])
def path(request, monkeypatch):
    """Run a test on the PyTorch path and on the Triton kernel (CPU: the interpreter, so only when
    the run started under TRITON_INTERPRET=1)."""
    if request.param == "kernel" and not INTERPRETED:
        pytest.skip("the Triton kernel runs on CPU only under TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "kernel" else "0")
    return request.param


def _rms(t: torch.Tensor) -> float:
    return math.sqrt(float(t.double().pow(2).mean())) if t.numel() else 0.0


def assert_parity(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype | None = None,
                  name: str = "output", fp32_tol: float = FP32_REL_TOL) -> None:
    """Assert that ``actual`` matches a float64 ``reference``.

    - float16 / bfloat16: the error must be at most twice the dtype's own rounding
      noise, i.e. max|actual - ref| <= 2 max|ref.to(dtype) - ref| and the same for the
      RMS (the flash-attn rule, STYLE.md "twice the dtype's rounding noise").
    - float32: max|actual - ref| <= fp32_tol * max(1, max|ref|).
    - float64: max|actual - ref| <= 1e-12 * max(1, max|ref|).

    The message reports max and RMS errors and the RMS ratio to the dtype's rounding noise.
    """
    dtype = dtype or actual.dtype
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    ref = reference.detach().double().cpu()
    act = actual.detach().double().cpu()
    assert torch.isfinite(act).all(), f"{name}: non-finite values in the result"
    err = (act - ref).abs()
    noise = (ref.to(dtype).double() - ref).abs()
    max_err, rms_err = float(err.max()) if err.numel() else 0.0, _rms(err)
    max_noise, rms_noise = float(noise.max()) if noise.numel() else 0.0, _rms(noise)
    ratio = rms_err / rms_noise if rms_noise > 0 else (0.0 if rms_err == 0 else math.inf)
    where = tuple(int(i) for i in torch.nonzero(err == err.max())[0]) if err.numel() else ()
    msg = (f"{name} ({dtype}): max err {max_err:.3e} at {where}, rms err {rms_err:.3e}; "
           f"{dtype} rounding noise max {max_noise:.3e}, rms {rms_noise:.3e}; rms ratio {ratio:.2f}")
    if dtype in (torch.float16, torch.bfloat16):
        assert max_err <= 2 * max_noise and rms_err <= 2 * rms_noise, msg + " (limit: 2x the rounding noise)"
    else:
        scale = max(1.0, float(ref.abs().max()) if ref.numel() else 1.0)
        tol = (fp32_tol if dtype == torch.float32 else 1e-12) * scale
        assert max_err <= tol, msg + f" (limit: max err {tol:.3e})"

"""The repository's kernels/ folder never shadows the `kernels` distribution transformers imports.

transformers >= 5.25 requires the Hugging Face `kernels` package and imports it at start-up.
The Triton sources live in the top-level kernels/ folder of this repository (its layout) and
install as ``longrope_triton.kernels``; the mechanism is explained in setup.py. Checked in the
places a user meets it: commands run from the repository root with the development install,
the same from another directory, ``pip install --no-build-isolation -e .`` run from the root
into a fresh environment, a built wheel installed into a fresh environment, and (in the
oldest-supported-transformers environment of scripts/test_oldest.sh) an environment without
`kernels` at all.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import venv

import pytest

pytestmark = pytest.mark.hf

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_SOURCES = ROOT / "kernels"

# Run in a subprocess: what `import kernels` resolves to, and that transformers starts.
PROBE = textwrap.dedent("""
    import importlib.util, json, pathlib, sys
    import transformers
    from transformers import LlamaConfig
    from transformers.integrations import hub_kernels
    import longrope_triton.kernels.rotary as rotary
    spec = importlib.util.find_spec("kernels")
    if spec is not None:
        import kernels
    print(json.dumps({
        "kernels_origin": None if spec is None else spec.origin,
        "kernels_locations": [] if spec is None else list(spec.submodule_search_locations or []),
        "rotary": str(pathlib.Path(rotary.__file__).resolve()),
        "longrope_triton": str(pathlib.Path(sys.modules["longrope_triton"].__file__).resolve()),
    }))
""")


def _kernels_installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _run(python: str, args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    proc = subprocess.run([python, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} in {cwd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _probe(python: str, cwd: pathlib.Path) -> dict:
    import json

    return json.loads(_run(python, ["-c", PROBE], cwd).stdout.strip().splitlines()[-1])


def _assert_no_shadowing(found: dict) -> None:
    """`import kernels` is the installed distribution when there is one; without one it is at most a
    namespace package (no code of ours runs under that name, and `from kernels import X` fails)."""
    if _kernels_installed():
        origin = pathlib.Path(found["kernels_origin"]).resolve()
        assert KERNEL_SOURCES not in origin.parents, f"`import kernels` resolved to this repository: {origin}"
    else:
        assert found["kernels_origin"] in (None, "namespace"), found


def _fresh_env(path: pathlib.Path) -> str:
    """A new virtual environment that sees this one's third-party packages (torch, transformers,
    setuptools, ...) through a plain path entry, so this environment's own install of
    longrope_triton stays invisible. No pip of its own (an old bundled setuptools would come
    first): this environment's pip installs into it with --python."""
    venv.EnvBuilder(with_pip=False).create(path)
    python = str(path / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if pathlib.Path(p).name in ("site-packages", "dist-packages")]
    pathlib.Path(site, "deps.pth").write_text("".join(p + "\n" for p in ours))
    return python


def _pip_into(python: str, args: list[str], cwd: pathlib.Path) -> None:
    _run(sys.executable, ["-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", *args], cwd)


def test_kernels_is_not_a_package_of_this_repository():
    """The mechanism itself: no __init__.py (a namespace portion only), and the subpackage link."""
    assert not (KERNEL_SOURCES / "__init__.py").exists()
    link = ROOT / "longrope_triton" / "kernels"
    assert link.is_symlink() and link.resolve() == KERNEL_SOURCES


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_transformers_starts_and_our_kernels_import(where, tmp_path):
    """The development install (scripts/test.sh's editable install), from the root and elsewhere."""
    cwd = ROOT if where == "root" else tmp_path
    found = _probe(sys.executable, cwd)
    _assert_no_shadowing(found)
    assert pathlib.Path(found["rotary"]).parent == KERNEL_SOURCES
    if where == "root":
        _run(sys.executable, ["-m", "longrope_triton.cli", "--help"], ROOT)
        _run(sys.executable, ["-m", "benchmarks.run", "--help"], ROOT)


def test_editable_install_from_the_root_without_build_isolation(tmp_path):
    """`pip install --no-build-isolation -e .` from the root (its build imports `kernels._internals`
    through an egg_info entry point), then used from the root and from another directory."""
    python = _fresh_env(tmp_path / "env")
    _pip_into(python, ["-e", "."], ROOT)
    for cwd in (ROOT, tmp_path):
        found = _probe(python, cwd)
        _assert_no_shadowing(found)
        assert pathlib.Path(found["rotary"]).parent == KERNEL_SOURCES, found


def test_built_wheel_in_a_fresh_environment(tmp_path):
    """A wheel carries the kernel sources as longrope_triton/kernels/*.py and nothing named kernels."""
    import zipfile

    dist = tmp_path / "dist"
    _run(sys.executable, ["-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                          "-w", str(dist), str(ROOT)], tmp_path)
    wheel = next(dist.glob("longrope_triton-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.split("/", 2)[2] for n in names if n.startswith("longrope_triton/kernels/")}
    assert {p.name for p in KERNEL_SOURCES.glob("*.py")} <= shipped
    assert not [n for n in names if n.startswith("kernels/")], "the wheel installs a top-level kernels package"
    python = _fresh_env(tmp_path / "env")
    _pip_into(python, [str(wheel)], tmp_path)
    found = _probe(python, tmp_path)
    _assert_no_shadowing(found)
    installed = pathlib.Path(found["longrope_triton"]).parent
    assert installed != ROOT / "longrope_triton" and pathlib.Path(found["rotary"]).parent == installed / "kernels"

# Sourced by scripts/test.sh, scripts/test_oldest.sh and scripts/demo.sh: create/activate the
# virtual environment $VENV (default .venv) and install the project with the extras named in
# $EXTRAS, under the pip constraints file $CONSTRAINTS when it is set. torch is pinned to the
# CPU build that lies on these machines (an unpinned torch would pull a multi-GB CUDA build).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
. "$VENV/bin/activate"
# pip's own cache stays on (CI reuses it); its notes about ignored local indexes are noise.
quiet_pip() {
    local rc=0
    python -m pip install -q "$@" > "$VENV/pip.log" 2>&1 || rc=$?
    grep -v "^WARNING: Location" "$VENV/pip.log" || true
    return "$rc"
}
python -c "import torch" 2>/dev/null || quiet_pip "torch==2.13.0"
quiet_pip -e ".[${EXTRAS}]" ${CONSTRAINTS:+-c "$CONSTRAINTS"}
python -c "import longrope_triton" || { echo "longrope_triton failed to install" >&2; exit 1; }
versions() {
    python -c "import sys, torch, triton, transformers; print(f'{sys.argv[1]}: python {sys.version.split()[0]}, ' \
f'torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}')" "$1"
}

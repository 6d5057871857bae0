# Sourced by scripts/test.sh and scripts/demo.sh: create/activate .venv and install the
# project with the extras named in $EXTRAS. torch is pinned to the CPU build that lies
# on these machines (an unpinned torch would pull a multi-GB CUDA build).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
quiet_pip() { python -m pip install -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
python -c "import torch" 2>/dev/null || quiet_pip "torch==2.13.0"
quiet_pip -e ".[${EXTRAS}]"
python -c "import longrope_triton" || { echo "longrope_triton failed to install" >&2; exit 1; }

#!/usr/bin/env bash
# The README's main command: install the project with its demo extra into .venv, fetch
# the offline model and texts (scripts/install_assets.sh), then run `longrope-triton demo`.
# Extra arguments go to the demo (e.g. --full).
set -euo pipefail
EXTRAS=demo
source "$(dirname "$0")/_venv.sh"
bash scripts/install_assets.sh
longrope-triton demo "$@"

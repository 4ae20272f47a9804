#!/usr/bin/env bash
# Idempotent setup of a fresh Debian machine (Python >= 3.11) for msfusion-flwr:
#   1. Fashion-MNIST from Debian's dataset-fashion-mnist package (when root);
#   2. a virtual environment .venv at the repository root;
#   3. this project, editable, with its test extra, into .venv.
# Run from anywhere: bash scripts/setup.sh. Re-running skips what is already done.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"
VENV="$REPO/.venv"
DATA_DIR=/usr/share/datasets/fashion-mnist
DATA_PKG=dataset-fashion-mnist

say() { printf '[setup] %s\n' "$*"; }

is_root() { [ "$(id -u)" -eq 0 ]; }

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        say "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        apt_updated=1
    fi
    say "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# 1. Data ---------------------------------------------------------------------
if dpkg -s "$DATA_PKG" >/dev/null 2>&1; then
    say "$DATA_PKG is installed ($DATA_DIR)"
elif is_root && command -v apt-get >/dev/null 2>&1; then
    apt_install "$DATA_PKG"
elif [ -d "$DATA_DIR" ]; then
    say "found Fashion-MNIST in $DATA_DIR"
else
    say "note: $DATA_PKG is not installed and this is not root, so it is not installed now;"
    say "      runs will use the run config's data-dir, or else torchvision downloads"
    say "      Fashion-MNIST to ~/.cache/msfusion-flwr on first use."
fi

# 2. Virtual environment -------------------------------------------------------
python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

if [ -x "$VENV/bin/python" ] && python_ok "$VENV/bin/python"; then
    say "using existing virtual environment $VENV ($("$VENV/bin/python" --version))"
else
    PYTHON=""
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
            PYTHON="$(command -v "$candidate")"
            break
        fi
    done
    if [ -z "$PYTHON" ]; then
        say "error: Python >= 3.11 not found (tried python3.11, python3)" >&2
        exit 1
    fi
    # Debian's own python3 needs python3-venv (ensurepip) to create a venv.
    if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        if is_root && command -v apt-get >/dev/null 2>&1; then
            apt_install "python3-venv"
        else
            say "error: $PYTHON cannot create virtual environments; install python3-venv" >&2
            exit 1
        fi
    fi
    say "creating virtual environment $VENV with $PYTHON ($("$PYTHON" --version))"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi

# 3. Project and dependencies ----------------------------------------------------
# Skip pip when pyproject.toml is unchanged since the last successful install.
STAMP="$VENV/.msfusion-flwr-setup"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
# Checked from / so that it is the install, not the working directory, that provides them.
installed_ok() {
    (cd / && "$VENV/bin/python" -c 'import msfusion_flwr, server_app, client_app, flwr, torch, pytest, hypothesis') >/dev/null 2>&1
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && installed_ok; then
    say "msfusion-flwr and its dependencies are already installed in $VENV"
else
    rm -f "$STAMP"
    say "pip install -e '.[test]' into $VENV (first time: downloads torch & co., several GB)"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -e ".[test]"
    installed_ok || { say "error: the install did not make msfusion_flwr importable" >&2; exit 1; }
    printf '%s\n' "$want" >"$STAMP"
fi

say "done. Activate with: source .venv/bin/activate"

#!/usr/bin/env bash
# The install steps of moeserve, shared by `make install` (and so `make serve` / `make test`) and the Dockerfile,
# so the two cannot drift.
#
#   scripts/install.sh deps     virtual environment at $VENV, pip upgraded, moeserve installed editable with
#                               the extras in $EXTRAS (pip install -e '.[EXTRAS]')
#   scripts/install.sh kernel   the compiled CPU experts kernel (python -m engine.offload.kernels.build)
#   scripts/install.sh all      both, in that order
#
# Environment: PYTHON (interpreter that creates the venv, default python3), VENV (default .venv), EXTRAS
# (default test; empty for none), TORCH_INDEX_URL (an extra package index for torch, e.g. PyTorch's CPU wheel
# index in the CPU image; unset = pip's configured indexes only). Runs from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS-test}
PY="$VENV/bin/python"

install_deps() {
    "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
    local index_args=()
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        index_args=(--extra-index-url "$TORCH_INDEX_URL")
    fi
    "$PY" -m pip install --quiet "${index_args[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
}

build_kernel() {
    "$PY" -m engine.offload.kernels.build
}

case "${1:-}" in
    deps) install_deps ;;
    kernel) build_kernel ;;
    all) install_deps; build_kernel ;;
    *) echo "usage: $0 deps|kernel|all" >&2; exit 2 ;;
esac

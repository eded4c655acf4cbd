#!/usr/bin/env bash
# Set up .venv with ctcurate, its pinned PyTorch and the development tools.
#
# PyTorch: machines without an NVIDIA GPU get the CPU build (a few hundred MB) instead of
# the multi-GB CUDA build an unpinned `torch` would pull; machines where `nvidia-smi`
# sees a GPU get the CUDA build. Override with CTCURATE_TORCH=cpu|cuda.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="2.13.0"
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }

variant="${CTCURATE_TORCH:-auto}"
if [ "$variant" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        variant=cuda
    else
        variant=cpu
    fi
fi

have_torch="$(.venv/bin/python -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
case "$variant" in
    cpu)
        if [ "$have_torch" != "${TORCH_VERSION}+cpu" ]; then
            echo "setup: installing PyTorch ${TORCH_VERSION} (CPU build)"
            # A local wheel house or mirror that carries the CPU build is used first;
            # otherwise PyTorch's own CPU index.
            pip install -q "torch==${TORCH_VERSION}+cpu" 2>/dev/null \
                || pip install -q "torch==${TORCH_VERSION}+cpu" \
                    --extra-index-url https://download.pytorch.org/whl/cpu
        fi
        ;;
    cuda)
        if [ "${have_torch%%+*}" != "${TORCH_VERSION}" ] || [ "${have_torch#*+}" = cpu ]; then
            echo "setup: installing PyTorch ${TORCH_VERSION} (CUDA build)"
            pip install -q "torch==${TORCH_VERSION}"
        fi
        ;;
    *)
        echo "setup: CTCURATE_TORCH must be cpu, cuda or auto (got '${variant}')" >&2
        exit 2
        ;;
esac

echo "setup: installing ctcurate and its dependencies into .venv"
pip install -q -c requirements.lock -e ".[dev]"   # the pinned environment (provenance)
.venv/bin/ctcurate --version

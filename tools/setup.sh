#!/usr/bin/env bash
# One-time set-up of this project on a fresh Debian/Ubuntu machine (root or sudo):
# the system libraries FFCV compiles against, then the package and its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! pkg-config --exists libturbojpeg opencv4 2>/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libturbojpeg0-dev libopencv-dev pkg-config
fi

PY=${PYTHON:-python3}
# torch and torchvision come in pairs: each torchvision release requires one torch release exactly,
# and pip would silently swap a user's torch (e.g. a CUDA build) for the one an unpaired torchvision
# asks for. So: keep a torch the user already has and install the torchvision paired with it, with
# that torch pinned by a constraint (pip then fails loudly rather than replace it). Without a torch,
# install the pair torch 2.14.1 + torchvision 0.29.1 (PyPI's builds, which run on CPUs and on CUDA).
declare -A TORCHVISION_FOR=([2.13]=0.28.0 [2.14]=0.29.1)
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
TORCH=$($PY -c "from importlib.metadata import version; print(version('torch'))")  # as pip knows it
TV=${TORCHVISION_FOR[$(echo "$TORCH" | cut -d. -f1,2)]:-}
if [ -z "$TV" ]; then
  echo "error: torch $TORCH is installed; this project pairs torchvision with torch 2.13 or 2.14." >&2
  echo "       Install one of those first (or use a fresh virtual environment), then rerun." >&2
  exit 1
fi
PIN=$(mktemp)
trap 'rm -f "$PIN"' EXIT
echo "torch==$TORCH" > "$PIN"
$PY -m pip install -q -c "$PIN" "torchvision==$TV" -e ".[dev]"
if ! ERR=$($PY -c "import torchvision, timm" 2>&1); then
  echo "error: torchvision $TV does not import beside torch $TORCH: $(echo "$ERR" | tail -n 1)" >&2
  echo "       PyPI's torchvision is built against PyPI's (CUDA) torch; a CPU-only torch build needs" >&2
  echo "       the matching CPU torchvision from PyTorch's own wheel index. Or, in a fresh virtual" >&2
  echo "       environment, this script installs torch 2.14.1 + torchvision 0.29.1 itself." >&2
  exit 1
fi
echo "set-up done: try \`iccl --help\`"

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
# asks for. So: keep a torch the user already has when its paired torchvision imports beside it
# (installed with that torch pinned, so pip fails rather than replace it). Otherwise (no torch, or a
# build no torchvision on PyPI fits, such as a CPU-only torch: PyPI's torchvision is built against
# PyPI's CUDA torch), install the pair torch 2.14.1 + torchvision 0.29.1, which runs on CPUs and CUDA.
declare -A TORCHVISION_FOR=([2.13]=0.28.0 [2.14]=0.29.1)
PAIR=("torch==2.14.1" "torchvision==0.29.1")
pair_imports() { $PY -c "import torch, torchvision" 2>/dev/null; }
installed() { $PY -c "from importlib.metadata import version; print(version('$1'))" 2>/dev/null; }
if $PY -c "import torch" 2>/dev/null && ! pair_imports; then
  TORCH=$(installed torch)
  TV=${TORCHVISION_FOR[$(echo "$TORCH" | cut -d. -f1,2)]:-}
  [ -n "$TV" ] && $PY -m pip install -q "torch==$TORCH" "torchvision==$TV" || true
  if ! pair_imports; then
    echo "torch $TORCH has no torchvision on PyPI that imports beside it: installing ${PAIR[*]}"
    $PY -m pip install -q "${PAIR[@]}"
  fi
fi
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "${PAIR[@]}"
PIN=$(mktemp)
trap 'rm -f "$PIN"' EXIT
printf 'torch==%s\ntorchvision==%s\n' "$(installed torch)" "$(installed torchvision)" > "$PIN"
# DALI's build must match torch's CUDA (one CUDA runtime per process); pyproject.toml names the
# CUDA 13 build that matches PyPI's torch wheels. Both builds install the same `nvidia.dali` files,
# so the other one goes first.
if $PY -c "import sys, torch; sys.exit(not (torch.version.cuda or '').startswith('12.'))"; then
  echo "torch is built for CUDA 12: using DALI's CUDA 12 build (nvidia-dali-cuda120)"
  $PY -m pip install -q -c "$PIN" -e ".[dev]"
  $PY -m pip uninstall -q -y nvidia-dali-cuda130
  $PY -m pip install -q "nvidia-dali-cuda120>=2.0"
else
  [ -n "$(installed nvidia-dali-cuda120)" ] && $PY -m pip uninstall -q -y nvidia-dali-cuda120
  $PY -m pip install -q -c "$PIN" -e ".[dev]"
fi
if ! ERR=$($PY -c "import torchvision, timm, nvidia.dali" 2>&1); then
  echo "error: the set-up did not give a working torch + torchvision + timm + DALI: $(echo "$ERR" | tail -n 1)" >&2
  exit 1
fi
echo "set-up done: try \`iccl --help\`"

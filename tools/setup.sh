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
# Keep a torch the user already has (e.g. a CUDA build); otherwise pin one release so that pip does not
# resolve an unpinned `torch` to whatever is newest.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[dev]"
# DALI's build must match torch's CUDA (one CUDA runtime per process); pyproject.toml names the
# CUDA 13 build that matches the pinned torch wheel.
if $PY -c "import sys, torch; sys.exit(not (torch.version.cuda or '').startswith('12.'))"; then
  echo "torch is built for CUDA 12: replacing DALI's CUDA 13 build with nvidia-dali-cuda120"
  $PY -m pip uninstall -q -y nvidia-dali-cuda130
  $PY -m pip install -q "nvidia-dali-cuda120>=2.0"
fi
echo "set-up done: try \`iccl --help\`"

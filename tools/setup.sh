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
echo "set-up done: try \`iccl --help\`"

#!/usr/bin/env bash
# Stage, inside this checkout, what scripts/gpu_check.sh needs on a GPU machine with no network and no
# Debian Fashion-MNIST package (docs/gpu.md). Both folders are git-ignored and travel only when carried:
#   data/fashion-mnist/  the four Fashion-MNIST IDX .gz files (~30 MB), from $MSNET_FASHION_DIR or
#                        Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)
#   .whl/                wheels of the pure-Python packages msnet needs beyond what a PyTorch image has
#                        (hydra-core, omegaconf, antlr4-python3-runtime), at the versions this Python has
#   scripts/stage_gpu_check.sh [--no-wheels]
set -eu
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
SRC="${MSNET_FASHION_DIR:-/usr/share/datasets/fashion-mnist}"
FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"

mkdir -p data/fashion-mnist
for f in $FILES; do
  if [ ! -f "$SRC/$f.gz" ]; then
    echo "stage_gpu_check: $SRC/$f.gz not found; apt-get install -y dataset-fashion-mnist, or set MSNET_FASHION_DIR" >&2
    exit 2
  fi
  cp -p "$SRC/$f.gz" data/fashion-mnist/
done
echo "stage_gpu_check: data/fashion-mnist/ ($(du -sh data/fashion-mnist | cut -f1))"

if [ "${1:-}" != "--no-wheels" ]; then
  PY="${PYTHON:-}"
  [ -z "$PY" ] && { [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; }
  PINS="$("$PY" -c 'import importlib.metadata as m; print(" ".join(f"{p}=={m.version(p)}" for p in ("hydra-core", "omegaconf", "antlr4-python3-runtime")))')"
  rm -rf .whl
  # pure-Python wheels (antlr4 4.9.x ships only a source archive, so pip builds its wheel here)
  "$PY" -m pip wheel -q --no-deps -w .whl $PINS
  echo "stage_gpu_check: .whl/ $(ls .whl | tr '\n' ' ')"
fi
echo "stage_gpu_check: carry [\"data\", \".whl\"] with the device run (docs/gpu.md)"

#!/usr/bin/env bash
# The GPU check (docs/gpu.md): CUDA-only tests, reversible-vs-store gradients under TF32/bf16,
# memory, two real Fashion-MNIST runs and the throughput table, in about 8 minutes on one GPU.
#
#   scripts/gpu_check.sh                 # on a GPU machine: results in $OUT or docs/gpu/, table into docs/gpu.md
#   scripts/gpu_check.sh --dry-run       # anywhere: the same steps on the CPU at toy sizes, < 1 minute
#   scripts/gpu_check.sh --out DIR --budget 450 --only cuda_tests,precision
#   scripts/gpu_check.sh --publish DIR   # put a finished run's table (DIR/gpu_check.md) into docs/gpu.md
#
# It works from a bare copy of the checkout: Python is $PYTHON, else ./.venv/bin/python, else python3;
# packages that Python lacks (hydra-core, omegaconf, antlr4) come from wheels in .whl/, and Fashion-MNIST
# from data/fashion-mnist/ (both staged by scripts/stage_gpu_check.sh, both git-ignored).
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python; else PY=python3; fi
fi
for arg in "$@"; do
  if [ "$arg" = "--publish" ]; then exec "$PY" scripts/gpu_check.py "$@"; fi
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/msnet-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl \
      || echo "gpu_check: installing .whl/ failed; msnet steps will fail" >&2
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: $PY lacks hydra-core/omegaconf and there is no .whl/ (scripts/stage_gpu_check.sh stages it)" >&2
  fi
fi

# This checkout's msnet with its configs where an installed wheel has them (msnet/conf), whatever is installed.
mkdir -p "$WORK/src"
cp -r msnet "$WORK/src/msnet" && cp -r conf "$WORK/src/msnet/conf" || exit 2
export PYTHONPATH="$WORK/src${PYTHONPATH:+:$PYTHONPATH}"

if [ -z "${MSNET_FASHION_DIR:-}" ] && [ -f data/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  export MSNET_FASHION_DIR="$REPO/data/fashion-mnist"
fi
if [ -z "${MSNET_CHECK_COMMIT:-}" ]; then
  MSNET_CHECK_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && MSNET_CHECK_COMMIT="$MSNET_CHECK_COMMIT+changes"
  export MSNET_CHECK_COMMIT
fi
export PYTHONUNBUFFERED=1 PYTORCH_NVML_BASED_CUDA_CHECK=1

"$PY" scripts/gpu_check.py --work "$WORK" "$@"

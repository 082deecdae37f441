#!/usr/bin/env bash
# Install everything msnet needs into ./.venv (idempotent: a re-run skips what is there).
#   - a virtual environment with the pinned torch==2.14.1 / torchvision==0.29.1
#   - msnet itself (editable) with its test, plot and sweep (Hydra joblib/submitit launchers, Optuna sweeper) extras,
#     and the tensorboard, mlflow and wandb extras (logger=tensorboard | logger=mlflow | logger=wandb)
#   - Fashion-MNIST for offline use, from Debian's dataset-fashion-mnist package, where apt can install it
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

if ! "$VPY" -c 'import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith("2.14.1") and torchvision.__version__.startswith("0.29.1")))' 2>/dev/null; then
  echo "setup: installing torch==2.14.1 torchvision==0.29.1 (a few minutes, about 5.6 GB)"
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q torch==2.14.1 torchvision==0.29.1
fi

if ! "$VPY" -c 'import msnet, hydra, rich, pytest, hypothesis, matplotlib, hydra_plugins.hydra_joblib_launcher, hydra_plugins.hydra_submitit_launcher, hydra_plugins.hydra_optuna_sweeper, tensorboard, mlflow, wandb' 2>/dev/null \
   || [ pyproject.toml -nt "$VENV/.msnet-installed" ]; then
  echo "setup: installing msnet and its dependencies"
  "$VPY" -m pip install -q -e '.[test,plot,sweep,tensorboard,mlflow,wandb]'
  touch "$VENV/.msnet-installed"
fi

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's dataset-fashion-mnist (offline Fashion-MNIST)"
    { apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; } \
      || echo "setup: could not install dataset-fashion-mnist; msnet will try to download Fashion-MNIST instead"
  else
    echo "setup: Fashion-MNIST is not installed; as root run: apt-get install -y dataset-fashion-mnist"
  fi
fi
echo "setup: ready ($("$VPY" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"

#!/usr/bin/env python
"""A fixed-seed short run of each method, and a hash of its final weights: the check that a restructuring
changed no behaviour. Run it on the tree before and after a change and compare the lines.

    .venv/bin/python scripts/weights_hashes.py > before.txt      # on the old tree (PYTHONPATH=OLD_TREE)
    .venv/bin/python scripts/weights_hashes.py | diff before.txt -

Each line: the case, the first 16 hex digits of a SHA-256 over the final ``last.pt`` weights (state-dict keys
sorted, raw bytes), and the run's final validation accuracy and test loss. Synthetic 8x8 data, 4 channels,
4 layers, 2 epochs, one CPU thread: about 10 s in all.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

BASE = ["dataset=synthetic", "dataset.n_train=600", "dataset.n_test=200", "dataset.val_size=200",
        "dataset.image_size=8", "model.channels=4", "model.layers=4", "trainer.epochs=2", "trainer.batch_size=64",
        "trainer.progress=false", "device=cpu", "threads=1"]
CASES = {
    "adam": [], "sgd_step": ["optimizer=sgd", "optimizer.scheduler=step"],
    "mgopt": ["trainer=mgopt", "trainer.levels=2"], "rmtr": ["trainer=rmtr", "trainer.levels=2"],
    "bcd": ["optimizer=bcd"], "depth": ["+depth=doubling", "depth.start=1"],
    "pyramid": ["+pyramid=2level", "pyramid.epochs=[1,1]"],
    "lm_sd": ["model.integrator=lm", "model.stochastic_depth.p_last=0.8"],
    "hamiltonian": ["model=hamiltonian", "model.backprop=reversible"],
}


def weights_hash(path: Path) -> str:
    h = hashlib.sha256()
    for k, v in sorted(torch.load(path, weights_only=True)["model"].items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> int:
    from msnet.config import register_configs
    from msnet.runs.display import RunConsole
    from msnet.training import train

    register_configs()
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in CASES.items():
            GlobalHydra.instance().clear()
            with initialize_config_module(config_module="msnet.conf", version_base="1.3"):
                cfg = compose("train", BASE + extra)
            summary = train(cfg, Path(tmp) / name, console=RunConsole(quiet=True))
            print(name, weights_hash(Path(tmp) / name / "checkpoints" / "last.pt"),
                  f"val_acc={summary['final_val_acc']} test_loss={summary['final_test_loss']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

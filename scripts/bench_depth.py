#!/usr/bin/env python
"""Shallow-to-deep (doubling) training against random initialisation at the final depth.

In one process, same data, width and optimiser, using msnet's own ``train_epoch`` and
``transfer_depth``:

* random: ``--final-depth`` layers from a random start, ``--epochs`` epochs;
* cascade: ``--start`` layers for ``--level-epochs`` epochs, prolong linearly in time to
  twice the layers (T kept), ... up to ``--final-depth``, then up to ``--epochs`` epochs there.

Validation accuracy is measured ``--evals-per-epoch`` times an epoch (evaluation time not
counted). The target is the random-init run's final validation accuracy minus 0.5
points; the script prints the training time and epochs each needs to reach it (the
cascade's time counts all its levels) and the ratio cascade / random (goal <= 0.5).

    .venv/bin/python scripts/bench_depth.py [--final-depth 32] [--epochs 2] [--train-subset 20000]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from omegaconf import OmegaConf

from msnet.config import DatasetConfig
from msnet.core import ModelSpec, StageSpec, build_model
from msnet.data import prepare_data
from msnet.multigrid import transfer_depth
from msnet.runs import RunConsole
from msnet.runs.display import records_table
from msnet.train.loop import evaluate, train_epoch
from msnet.train.optim import build_optimizer


def train_level(model, data, epochs, evals, opt_cfg, g, trace, clock, label, target=None):
    """Train in ``evals`` chunks per epoch; stop early once ``target`` validation accuracy is reached."""
    opt = build_optimizer(model.parameters(), opt_cfg)
    n = data.x_train.shape[0]
    for epoch in range(epochs):
        for k, chunk in enumerate(torch.randperm(n, generator=g).chunk(evals)):
            clock[0] += train_epoch(model, opt, data.x_train[chunk], data.y_train[chunk], 128, g).seconds
            acc = evaluate(model, data.x_val, data.y_val)["acc"]
            trace.append({"run": label, "train_s": clock[0], "val_acc": acc, "epochs": epoch + (k + 1) / evals})
            if target is not None and acc >= target:
                return model
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--final-depth", type=int, default=32)
    ap.add_argument("--start", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2, help="epochs at the final depth (random init; cascade's cap)")
    ap.add_argument("--level-epochs", type=float, default=1.0, help="epochs at each shallower cascade level")
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--T", type=float, default=1.0)
    ap.add_argument("--train-subset", type=int, default=20000)
    ap.add_argument("--evals-per-epoch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()

    data = prepare_data(OmegaConf.structured(DatasetConfig(name="fashion_mnist", download=False, val_size=2000,
                                                           train_subset=args.train_subset)), torch.device("cpu"))
    opt_cfg = OmegaConf.create({"name": "adam", "lr": args.lr, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0})

    def spec(layers):
        return ModelSpec(data.in_channels, data.num_classes, data.image_size, [StageSpec(args.channels, layers, args.T)])

    console = RunConsole()
    torch.manual_seed(0)
    random_trace, clock = [], [0.0]
    console.print(f"random init: {args.final_depth} layers, {args.epochs} epochs ...")
    train_level(build_model(spec(args.final_depth)), data, args.epochs, args.evals_per_epoch, opt_cfg,
                torch.Generator().manual_seed(0), random_trace, clock, "random")
    target = random_trace[-1]["val_acc"] - 0.005

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cascade_trace, clock = [], [0.0]
    depths = [args.start]
    while depths[-1] < args.final_depth:
        depths.append(depths[-1] * 2)
    model = build_model(spec(depths[0]))
    evals_shallow = max(1, round(args.evals_per_epoch * args.level_epochs))
    for d in depths[:-1]:
        console.print(f"cascade: {d} layers ...")
        n_sub = int(data.x_train.shape[0] * min(1.0, args.level_epochs))
        sub = data if args.level_epochs >= 1 else replace(data, x_train=data.x_train[:n_sub], y_train=data.y_train[:n_sub])
        train_level(model, sub, max(1, int(args.level_epochs)), evals_shallow, opt_cfg, g, cascade_trace, clock, f"cascade {d}")
        model = transfer_depth(model, 2 * d)
    console.print(f"cascade: {depths[-1]} layers, up to {args.epochs} epochs ...")
    before_final = clock[0]
    train_level(model, data, args.epochs, args.evals_per_epoch, opt_cfg, g, cascade_trace, clock,
                f"cascade {depths[-1]}", target)

    def hit(trace, label_prefix):
        return next((r for r in trace if r["run"].startswith(label_prefix) and r["val_acc"] >= target), None)

    r, c = hit(random_trace, "random"), hit(cascade_trace, f"cascade {depths[-1]}")
    rows = [
        {"run": f"random init, {args.final_depth} layers", "final_val_acc": f"{random_trace[-1]['val_acc']:.2%}",
         "time_to_target_s": r["train_s"] if r else None, "epochs_at_final_depth": r["epochs"] if r else None},
        {"run": f"doubling {' -> '.join(map(str, depths))}", "final_val_acc": f"{cascade_trace[-1]['val_acc']:.2%}",
         "time_to_target_s": c["train_s"] if c else None, "epochs_at_final_depth": c["epochs"] if c else None,
         "shallow_levels_s": before_final},
    ]
    console.print(records_table(f"time to {target:.2%} validation accuracy at {args.final_depth} layers "
                                "(random-init final - 0.5 points)", rows,
                                ["run", "final_val_acc", "time_to_target_s", "epochs_at_final_depth", "shallow_levels_s"]))
    console.print(f"data fashion_mnist, {data.x_train.shape[0]} training images, {args.channels} channels, T={args.T}, "
                  f"Adam lr {args.lr}, {torch.get_num_threads()} threads")
    if r and c:
        console.print(f"ratio cascade / random = {c['train_s'] / r['train_s']:.3f}  (goal <= 0.5)")
    else:
        console.print("the cascade did not reach the target within its budget: ratio undefined (> 1)")


if __name__ == "__main__":
    main()

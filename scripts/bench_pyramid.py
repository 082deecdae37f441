#!/usr/bin/env python
"""Coarse-to-fine (pyramid) training against single-level fine training: wall time to a target.

In one process, on the same data, network and optimiser:

* single: train at full resolution for ``--epochs`` epochs;
* pyramid: ``+pyramid=2level``'s schedule: ``--coarse-epochs`` epochs on images restricted
  once (Gaussian smoothing then R), prolong stencils and classifier (msnet.multigrid),
  then up to ``--epochs`` epochs at full resolution.

Both use msnet's own ``train_epoch``, ``level_data`` and ``transfer_resolution``.
Validation accuracy is measured every ``1/--evals-per-epoch`` of an epoch; evaluation time
is excluded from the clocks, and the two runs advance in turns, chunk by chunk, so that
noise from other work on the machine hits both alike. The target is the single-level run's final validation
accuracy minus 0.5 points; the script prints each run's training wall time to reach it
and the ratio pyramid / single (goal <= 0.6; the paper saw 0.74 on ImageNet-10).

    .venv/bin/python scripts/bench_pyramid.py [--epochs 3] [--coarse-epochs 2] [--channels 8]
"""

from __future__ import annotations

import argparse
import time

import torch
from omegaconf import OmegaConf

from msnet.config import DatasetConfig
from msnet.core import ModelSpec, StageSpec, build_model
from msnet.data import prepare_data
from msnet.multigrid import transfer_resolution
from msnet.runs import RunConsole
from msnet.runs.display import records_table
from msnet.train.loop import evaluate, train_epoch
from msnet.train.optim import build_optimizer, build_scheduler
from msnet.train.schedule import level_data


def run_level(model, data, epochs, evals, opt_cfg, g, trace, clock, label, batch_size):
    """Train ``epochs`` epochs in ``evals`` chunks each, yielding after every chunk.

    Appends (train seconds, val acc) to ``trace``; returns the model at the end.
    """
    opt = build_optimizer(model.parameters(), opt_cfg)
    sched = build_scheduler(opt, opt_cfg, epochs)
    n = data.x_train.shape[0]
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        for chunk in perm.chunk(evals):
            res = train_epoch(model, opt, data.x_train[chunk], data.y_train[chunk], batch_size, g)
            clock[0] += res.seconds
            acc = evaluate(model, data.x_val, data.y_val)["acc"]
            trace.append({"run": label, "train_s": clock[0], "val_acc": acc, "epoch": epoch + 1})
            yield
        if sched is not None:
            sched.step()
    return model


def pyramid_run(spec, coarse_data, data, args, opt_cfg, trace, clock):
    """The pyramid schedule as one generator: coarse level, prolongation, fine level."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    coarse = transfer_resolution(build_model(spec), -1)
    coarse = yield from run_level(coarse, coarse_data, args.coarse_epochs, args.evals_per_epoch, opt_cfg, g,
                                  trace, clock, "pyramid coarse", args.batch_size)
    t0 = time.perf_counter()
    fine = transfer_resolution(coarse, +1)
    clock[0] += time.perf_counter() - t0
    yield from run_level(fine, data, args.epochs, args.evals_per_epoch, opt_cfg, g, trace, clock,
                         "pyramid fine", args.batch_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3, help="fine epochs (single run; upper bound for the pyramid)")
    ap.add_argument("--coarse-epochs", type=int, default=2)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--evals-per-epoch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()

    data = prepare_data(OmegaConf.structured(DatasetConfig(name="fashion_mnist", download=False,
                                                           train_subset=args.train_subset)), torch.device("cpu"))
    coarse_data = level_data(data, 1)
    spec = ModelSpec(data.in_channels, data.num_classes, data.image_size, [StageSpec(args.channels, args.layers, 1.0)])
    opt_cfg = OmegaConf.create({"name": "adam", "lr": args.lr, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0,
                                "scheduler": "cosine"})
    console = RunConsole()

    # The two runs advance in turns, one chunk each, so that machine noise hits both alike.
    single_trace, single_clock = [], [0.0]
    pyr_trace, pyr_clock = [], [0.0]
    torch.manual_seed(0)
    single = run_level(build_model(spec), data, args.epochs, args.evals_per_epoch, opt_cfg,
                       torch.Generator().manual_seed(0), single_trace, single_clock, "single", args.batch_size)
    pyramid = pyramid_run(spec, coarse_data, data, args, opt_cfg, pyr_trace, pyr_clock)
    console.print(f"single-level: {args.epochs} epochs at 28x28; pyramid: {args.coarse_epochs} epochs at 14x14, "
                  f"then {args.epochs} at 28x28; interleaved chunk by chunk ...")
    active = [single, pyramid]
    while active:
        for run in list(active):
            try:
                next(run)
            except StopIteration:
                active.remove(run)
    target = single_trace[-1]["val_acc"] - 0.005

    def time_to(trace):
        hit = next((r for r in trace if r["val_acc"] >= target), None)
        return (hit["train_s"], hit["run"], hit["epoch"]) if hit else (None, None, None)

    ts, _, _ = time_to(single_trace)
    tp, where, ep = time_to(pyr_trace)
    rows = [
        {"run": "single-level 28x28", "final_val_acc": f"{single_trace[-1]['val_acc']:.2%}",
         "train_s": single_trace[-1]["train_s"], "time_to_target_s": ts},
        {"run": "pyramid 14x14 -> 28x28", "final_val_acc": f"{pyr_trace[-1]['val_acc']:.2%}",
         "train_s": pyr_trace[-1]["train_s"], "time_to_target_s": tp},
    ]
    console.print(records_table(f"time to {target:.2%} validation accuracy (single-level final - 0.5 points)",
                                rows, ["run", "final_val_acc", "train_s", "time_to_target_s"]))
    console.print(f"data fashion_mnist, {data.x_train.shape[0]} training images, {args.channels} channels x "
                  f"{args.layers} layers, batch {args.batch_size}, Adam lr {args.lr} cosine, {torch.get_num_threads()} threads")
    if tp is None:
        console.print("pyramid did not reach the target within its budget: ratio undefined (> 1)")
    else:
        console.print(f"pyramid reached it in level '{where}', epoch {ep}")
        console.print(f"ratio pyramid / single = {tp / ts:.3f}  (goal <= 0.6)")


if __name__ == "__main__":
    main()

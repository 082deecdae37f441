#!/usr/bin/env python
"""Shallow-to-deep (doubling) training against random initialisation at the final depth.

In one process, same data, width and optimiser (Adam, constant learning rate, a fresh one per
level), each configured and trained as ``msnet train`` would (its config groups, and its level
loop ``msnet.training.fit.run_levels`` through ``scripts/bench/_harness.py``):

* random: ``msnet train model.layers=FINAL``: ``--final-depth`` layers from a random start,
  ``--epochs`` epochs;
* cascade: ``msnet train +depth=doubling``: ``--start`` layers for ``--level-epochs`` epochs,
  prolonged linearly in time to twice the layers (T kept), ... up to ``--final-depth``, then up
  to ``--epochs`` epochs there, stopped once it reaches the target.

Validation accuracy is measured ``--evals-per-epoch`` times an epoch (evaluation time not
counted; the moves between depths count). The two runs advance in turns, chunk by chunk, so
that noise from other work on the machine hits both alike. The target is the random-init run's
final validation accuracy minus 0.5 points; the script prints the training time and epochs each
needs to reach it (the cascade's time counts all its levels) and the ratio cascade / random
(goal <= 0.5).

    .venv/bin/python scripts/bench/bench_depth.py [--final-depth 32] [--epochs 2] [--train-subset 20000] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any, Dict, Iterator, List

import torch
from hydra.errors import HydraException

from _harness import Point, first_hit, interleave, points, start, train_config
from msnet import MsnetError
from msnet.core import resolve_device, resolve_dtype
from msnet.data import prepare_data
from msnet.runs import RunConsole
from msnet.runs.display import records_table
from msnet.training.fit import Step, run_levels
from msnet.training.schedule import Schedule
from msnet.training.state import RunState


def cut_levels(state: RunState, schedule: Schedule, data: Any, cfg: Any, evals: int, chunks: int) -> Iterator[Step]:
    """The level loop's steps, each level before the last cut after ``chunks`` evaluations.

    ``--level-epochs`` below 1 (or not whole) asks for part of an epoch, which the loop does not
    schedule: the generator is then stopped, the network moved onto the next level as
    ``run_levels`` moves it (``Schedule.move``, timed as training), and the loop started again there.
    """
    while True:
        steps = run_levels(state, schedule, data, cfg, evals_per_epoch=evals, summaries=False)
        done = 0
        for step in steps:
            yield step
            done = 0 if step.kind == "level" else done + 1
            if done == chunks and state.level_index < len(schedule) - 1 and not state.finished(schedule):
                break
        else:
            return
        steps.close()
        src, dst = schedule[state.level_index], schedule[state.level_index + 1]
        t0 = time.perf_counter()
        state.model, _ = schedule.move(state.model, src, dst, data)
        state.level_index, state.level_epoch = state.level_index + 1, 0
        yield Step("level", dst, {}, time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--final-depth", type=int, default=32)
    ap.add_argument("--start", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2, help="epochs at the final depth (random init; cascade's cap)")
    ap.add_argument("--level-epochs", type=float, default=1.0, help="epochs at each shallower cascade level "
                    "(fractions allowed: the level stops after that share of its evaluations)")
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--T", type=float, default=1.0)
    ap.add_argument("--train-subset", type=int, default=20000)
    ap.add_argument("--evals-per-epoch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.level_epochs <= 0:
        raise MsnetError(f"--level-epochs must be positive, got {args.level_epochs}")

    shared = ["dataset.val_size=2000", f"dataset.train_subset={args.train_subset}", "dataset.test_subset=0",
              f"model.channels={args.channels}", f"model.layers={args.final_depth}", f"model.T={args.T}",
              "optimizer=adam", f"optimizer.lr={args.lr}", "optimizer.scheduler=constant", "trainer.batch_size=128",
              "trainer.progress=false", "trainer.eval_batch_size=1000", "seed=0"]
    random_cfg = train_config([*shared, f"trainer.epochs={args.epochs}"])
    depths = [args.start]
    while depths[-1] < args.final_depth:
        depths.append(depths[-1] * 2)
    level_epochs = [math.ceil(args.level_epochs)] * (len(depths) - 1) + [args.epochs]
    cascade_cfg = train_config([*shared, "+depth=doubling", f"depth.start={args.start}",
                                f"depth.stop={args.final_depth}", "depth.factor=2",
                                f"depth.epochs=[{','.join(map(str, level_epochs))}]"])
    data = prepare_data(random_cfg.dataset, resolve_device(random_cfg.device), resolve_dtype(random_cfg.dtype))
    n, evals = data.sizes()["train"], args.evals_per_epoch
    chunks = max(1, round(evals * args.level_epochs))

    random_state, random_schedule = start(random_cfg, data)
    random_points = points(random_state, run_levels(random_state, random_schedule, data, random_cfg,
                                                    evals_per_epoch=evals, summaries=False), n, 128, evals)
    cascade_state, cascade_schedule = start(cascade_cfg, data)
    cascade_points = points(cascade_state, cut_levels(cascade_state, cascade_schedule, data, cascade_cfg, evals, chunks),
                            n, 128, evals)

    random_trace: List[Dict[str, Any]] = []
    cascade_trace: List[Dict[str, Any]] = []
    target: Dict[str, float] = {}

    def record(label: str, p: Point) -> Dict[str, Any]:
        return {"run": label, "layers": p["layers"], "train_s": p["train_s"], "val_acc": p["val_acc"],
                "epochs": p["level_epoch"]}

    def random_run() -> Iterator[None]:
        for p in random_points:
            random_trace.append(record("random", p))
            yield
        target["acc"] = random_trace[-1]["val_acc"] - 0.005

    def at_final(trace: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        return [r for r in trace if r["layers"] == args.final_depth]

    def cascade_run() -> Iterator[None]:
        for p in cascade_points:
            cascade_trace.append(record(f"cascade {p['layers']}", p))
            yield
            if "acc" in target and first_hit(at_final(cascade_trace), target["acc"]):
                return  # the target is known and reached: the rest of the cascade's budget is not needed

    console = RunConsole()
    console.print(f"random init: {args.final_depth} layers, {args.epochs} epochs; cascade {' -> '.join(map(str, depths))} "
                  f"layers, {args.level_epochs:g} epochs per shallow level, up to {args.epochs} at {args.final_depth}; "
                  "interleaved chunk by chunk ...")
    interleave(random_run(), cascade_run())

    r, c = first_hit(random_trace, target["acc"]), first_hit(at_final(cascade_trace), target["acc"])
    shallow = [x for x in cascade_trace if x["layers"] != args.final_depth]
    rows = [
        {"run": f"random init, {args.final_depth} layers", "final_val_acc": f"{random_trace[-1]['val_acc']:.2%}",
         "time_to_target_s": r["train_s"] if r else None, "epochs_at_final_depth": r["epochs"] if r else None},
        {"run": f"doubling {' -> '.join(map(str, depths))}", "final_val_acc": f"{cascade_trace[-1]['val_acc']:.2%}",
         "time_to_target_s": c["train_s"] if c else None, "epochs_at_final_depth": c["epochs"] if c else None,
         "shallow_levels_s": shallow[-1]["train_s"] if shallow else 0.0},
    ]
    console.print(records_table(f"time to {target['acc']:.2%} validation accuracy at {args.final_depth} layers "
                                "(random-init final - 0.5 points)", rows,
                                ["run", "final_val_acc", "time_to_target_s", "epochs_at_final_depth", "shallow_levels_s"]))
    console.print(f"data {data.name}, {data.x_train.shape[0]} training images, {args.channels} channels, T={args.T}, "
                  f"Adam lr {args.lr}, {torch.get_num_threads()} threads")
    if r and c:
        console.print(f"ratio cascade / random = {c['train_s'] / r['train_s']:.3f}  (goal <= 0.5)")
    else:
        console.print("the cascade did not reach the target within its budget: ratio undefined (> 1)")


if __name__ == "__main__":
    try:
        main()
    except (MsnetError, HydraException) as err:  # a bad flag or override: one line, no traceback
        raise SystemExit(f"bench_depth: error: {str(err).splitlines()[0]}")

#!/usr/bin/env python
"""Shallow-to-deep (doubling) training against random initialisation at the final depth, each with a tuned
learning rate.

In one process, same data, width and optimiser (Adam, constant learning rate, a fresh one per
level unless ``--carry``), each configured and trained as ``msnet train`` would (its config groups, and its level
loop ``msnet.training.fit.run_levels`` through ``scripts/bench/_harness.py``):

* random: ``msnet train model.layers=FINAL optimizer.lr=LR``: ``--final-depth`` layers from a random
  start, ``--epochs`` epochs, for every LR of ``--lrs``;
* cascade: ``msnet train +depth=doubling depth.sizing=cost depth.epochs=[S,...,S,EPOCHS] optimizer.lr=LR``:
  ``--start`` layers, prolonged linearly in time to twice the layers (T kept), ... up to
  ``--final-depth``, for every LR of ``--cascade-lrs``. Each shallow level gets ``--shallow`` epochs
  *at the final depth's cost* (``--sizing cost``, default: a level of d layers trains S * FINAL / d
  epochs, fractions allowed) or ``--shallow`` epochs (``--sizing epochs``, the old rule), then up to
  ``--epochs`` at the final depth, stopped once it reaches the target.

Validation accuracy is measured ``--evals-per-epoch`` times an epoch (evaluation time not
counted; the moves between depths count). All runs advance in turns, chunk by chunk, so that
noise from other work on the machine hits all alike. The target is the best random-init run's
final validation accuracy minus 0.5 points; the baseline time is the fastest random-init run to
reach it (any learning rate of the grid), the cascade's the fastest cascade (its time counts all
its levels); the last line is the ratio cascade / random (goal <= 0.5).

    .venv/bin/python scripts/bench/bench_depth.py [--final-depth 32] [--epochs 2] [--train-subset 4096] [--threads 1]
    .venv/bin/python scripts/bench/bench_depth.py --sizing epochs --shallow 0.5    # the old rule, half an epoch each
    .venv/bin/python scripts/bench/bench_depth.py --carry both    # cascades with a fresh Adam per level and with
                                                                  # Adam's moments carried (depth.carry_optimizer)
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Iterator, List

import torch
from hydra.errors import HydraException

from _harness import Point, first_hit, interleave, run, train_config, write_md_json
from msnet.errors import MsnetError
from msnet.core import resolve_device, resolve_dtype
from msnet.data import prepare_data
from msnet.runs import RunConsole
from msnet.runs.display import records_table


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--final-depth", type=int, default=32)
    ap.add_argument("--start", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2, help="epochs at the final depth (random init; cascade's cap)")
    ap.add_argument("--shallow", type=float, default=0.1, help="each shallower cascade level's budget: epochs at "
                    "the final depth's cost (--sizing cost) or epochs (--sizing epochs); fractions allowed")
    ap.add_argument("--sizing", choices=["cost", "epochs"], default="cost", help="depth.sizing of the cascade")
    ap.add_argument("--lrs", default="1e-3,2e-3,4e-3", help="Adam learning rates of the random-init runs")
    ap.add_argument("--cascade-lrs", default="1e-3,2e-3,4e-3", help="Adam learning rates of the cascades")
    ap.add_argument("--carry", choices=["off", "on", "both"], default="off",
                    help="depth.carry_optimizer of the cascades: off (a fresh Adam per level), on (Adam's moments move "
                         "with the weights; runs labelled 'carry'), both (each cascade LR twice, side by side)")
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--T", type=float, default=1.0)
    ap.add_argument("--train-subset", type=int, default=4096)
    ap.add_argument("--val-size", type=int, default=1000)
    ap.add_argument("--evals-per-epoch", type=int, default=4)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="folder for bench_depth.json (every trace, the rows and the ratio)")
    args = ap.parse_args()
    if args.shallow < 0:
        raise MsnetError(f"--shallow must be >= 0, got {args.shallow}")
    try:
        args.lrs, args.cascade_lrs = ([float(x) for x in v.split(",")] for v in (args.lrs, args.cascade_lrs))
    except ValueError as err:
        raise MsnetError(f"--lrs and --cascade-lrs take comma-separated numbers ({err})") from None
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shared = [f"dataset={args.dataset}", "dataset.val_size=" + str(args.val_size), f"dataset.train_subset={args.train_subset}",
              "dataset.test_subset=0", f"model.channels={args.channels}", f"model.layers={args.final_depth}",
              f"model.T={args.T}", "optimizer=adam", "optimizer.scheduler=constant", "trainer.batch_size=128",
              "trainer.progress=false", "trainer.eval_batch_size=1000", "seed=0"]
    depths = [args.start]
    while depths[-1] < args.final_depth:
        depths.append(depths[-1] * 2)
    entries = ",".join([f"{args.shallow:g}"] * (len(depths) - 1) + [str(args.epochs)])
    cascade = ["+depth=doubling", f"depth.start={args.start}", f"depth.stop={args.final_depth}", "depth.factor=2",
               f"depth.sizing={args.sizing}", f"depth.epochs=[{entries}]"]
    configs = {f"random lr {lr:g}": train_config([*shared, f"trainer.epochs={args.epochs}", f"optimizer.lr={lr}"])
               for lr in args.lrs}
    kinds = {"off": [("cascade", "false")], "on": [("carry", "true")],
             "both": [("cascade", "false"), ("carry", "true")]}[args.carry]
    for kind, carry in kinds:
        configs.update({f"{kind} lr {lr:g}": train_config([*shared, *cascade, f"depth.carry_optimizer={carry}",
                                                           f"optimizer.lr={lr}"]) for lr in args.cascade_lrs})
    first = next(iter(configs.values()))
    data = prepare_data(first.dataset, resolve_device(first.device), resolve_dtype(first.dtype))
    traces: Dict[str, List[Dict[str, Any]]] = {name: [] for name in configs}
    target: Dict[str, float] = {}

    def traced(name: str, pts: Iterator[Point]) -> Iterator[None]:
        for p in pts:
            traces[name].append({"run": name, "layers": p["layers"], "train_s": p["train_s"],
                                 "val_acc": p["val_acc"], "epochs": p["level_epoch"]})
            yield
            if name.startswith("random"):
                continue
            if not any(len(traces[r]) == 0 or r not in done for r in randoms):
                target.setdefault("acc", max(traces[r][-1]["val_acc"] for r in randoms) - 0.005)
            if "acc" in target and first_hit(at_final(traces[name]), target["acc"]):
                return  # the target is known and reached: the rest of the cascade's budget is not needed

    def finishing(name: str, it: Iterator[None]) -> Iterator[None]:
        yield from it
        done.add(name)

    def at_final(trace: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        return [r for r in trace if r["layers"] == args.final_depth]

    randoms = [n for n in configs if n.startswith("random")]
    done: set = set()
    runs = [finishing(n, traced(n, run(cfg, data, args.evals_per_epoch)[1])) for n, cfg in configs.items()]
    console = RunConsole()
    console.console.width = max(console.console.width, 120)  # the result table has five columns
    console.print(f"random init: {args.final_depth} layers, {args.epochs} epochs, lr {args.lrs}; cascade "
                  f"{' -> '.join(map(str, depths))} layers, depth.sizing={args.sizing}, {args.shallow:g} per shallow "
                  f"level, up to {args.epochs} epochs at {args.final_depth}, lr {args.cascade_lrs}, optimiser state carried: "
                  f"{args.carry}; interleaved ...")
    interleave(*runs)
    report(console, args, data, depths, traces, target.get("acc", max(traces[r][-1]["val_acc"] for r in randoms) - 0.005))


def report(console: RunConsole, args: argparse.Namespace, data: Any, depths: List[int],
           traces: Dict[str, List[Dict[str, Any]]], target: float) -> None:
    """Print each run's time to ``target`` and the ratio of the fastest cascade to the fastest random-init run."""
    rows, best = [], {}
    for name, trace in traces.items():
        kind = name.split()[0]
        hit = first_hit([r for r in trace if r["layers"] == args.final_depth], target)
        shallow = [r for r in trace if r["layers"] != args.final_depth]
        rows.append({"run": name, "final_val_acc": f"{trace[-1]['val_acc']:.2%}",
                     "time_to_target_s": round(hit["train_s"], 1) if hit else None,
                     "epochs_at_final_depth": hit["epochs"] if hit else None,
                     "shallow_levels_s": round(shallow[-1]["train_s"], 1) if shallow else None})
        if hit and (kind not in best or hit["train_s"] < best[kind][1]["train_s"]):
            best[kind] = (name, hit)
    console.print(records_table(f"time to {target:.2%} validation accuracy at {args.final_depth} layers "
                                "(best random-init final - 0.5 points)",
                                [{k: f"{v:g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows],
                                ["run", "final_val_acc", "time_to_target_s", "epochs_at_final_depth", "shallow_levels_s"]))
    console.print(f"data {data.name}, {data.x_train.shape[0]} training images, {args.channels} channels, T={args.T}, "
                  f"cascade {' -> '.join(map(str, depths))}, {torch.get_num_threads()} threads")
    ratios: Dict[str, Any] = {}
    for kind in dict.fromkeys(name.split()[0] for name in traces if not name.startswith("random")):
        what = "cascade" if kind == "cascade" else "cascade with its optimiser state carried (carry)"
        if "random" in best and kind in best:
            (rn, r), (cn, c) = best["random"], best[kind]
            ratios[kind] = c["train_s"] / r["train_s"]
            console.print(f"ratio {kind} / random = {ratios[kind]:.3f}  ({cn}: {c['train_s']:.1f} s; "
                          f"{rn}: {r['train_s']:.1f} s; goal <= 0.5)")
        else:
            ratios[kind] = None
            console.print(f"no {what} reached the target within its budget: ratio undefined (> 1)")
    if args.out:
        best_runs = {k: v[0] for k, v in best.items()}
        write_md_json(args.out, "bench_depth", None, {"args": vars(args), "target": target, "traces": traces,
                                                      "rows": rows, "best": best_runs, "ratio": next(iter(ratios.values())),
                                                      "ratios": ratios})

if __name__ == "__main__":
    try:
        main()
    except (MsnetError, HydraException) as err:  # a bad flag or override: one line, no traceback
        raise SystemExit(f"bench_depth: error: {str(err).splitlines()[0]}")

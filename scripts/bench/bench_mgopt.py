#!/usr/bin/env python
"""Multilevel training (trainer=mgopt, trainer=rmtr) against tuned single-level training: work and wall time
to a target accuracy.

In one process, on the same data (same batches in the same order), the same network (same
initial weights), each configured and trained as ``msnet train`` would (its config groups, and its
level loop ``msnet.training.fit.run_levels`` through ``scripts/bench/_harness.py``):

* single: ``msnet train optimizer.lr=LR`` (one Adam/SGD step per mini-batch, msnet's FirstOrder rule),
  ``--epochs`` epochs, once for every LR of ``--baseline-lrs`` (default: ``--lr`` times 0.5, 1, 2): the
  baseline is tuned on the same budget and batch schedule;
* mgopt: ``msnet train trainer=mgopt`` (one MG/OPT cycle per mini-batch, the smoother ``--optimizer`` at
  ``--lr``, settings from the flags and ``--mgopt-extra``);
* rmtr: ``msnet train trainer=rmtr`` (one RMTR V-cycle per mini-batch, L-SR1 trust region, ``--levels``,
  ``--radius``, ``--window-max`` and ``--rmtr-extra``);
* cascade (with ``--cascade-extra OVERRIDES``): single-level training at ``--lr`` with OVERRIDES, e.g. the
  depth cascade ``+depth=doubling ...``, the control for a nested-iteration multilevel run (the same overrides in
  ``--mgopt-extra`` / ``--rmtr-extra``: MG/OPT or RMTR started from the shallower networks); a gradient of d
  layers counts d / ``--layers`` FGE, and the target counts only at the full depth;
  each multilevel run (``--method``) is stopped once it has spent ``--budget-factor`` times the single runs' work.

Work is counted in fine-gradient equivalents (FGE; msnet.methods.mgopt's docstring): a single run
spends 1 FGE per batch, a multilevel cycle what its levels' gradients and forward passes cost.
Validation accuracy is measured before training and about every ``--eval-every`` batches
(cycles): the loop splits each epoch into round(batches per epoch / eval-every) chunks.
Evaluation is excluded from the clocks and from the work. All runs advance in turns, chunk by
chunk, so that noise from other work on the machine hits all alike. The target is the best
single run's plateau (the mean of its last three evaluations, best over the grid) minus 0.5
points; the baseline is the single run (any LR) that reaches it with the least work. The script
prints, for each run, the wall time, the FGE and the epochs to the target, and as its last lines
the ratios baseline / method (goals: >= 3 in FGE, >= 2 in wall time). With ``--out DIR`` it writes
DIR/bench_mgopt.png (validation accuracy against work and against wall time) and DIR/bench_mgopt.json.

    .venv/bin/python scripts/bench/bench_mgopt.py --quick --threads 1    # the best regime found, ~3-4 min on 2 cores
    .venv/bin/python scripts/bench/bench_mgopt.py                        # 32 layers, 10,000 images: long
    .venv/bin/python scripts/bench/bench_mgopt.py --method rmtr --batch-size 0 --epochs 40   # full batch
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Dict, Iterator, List, Tuple

import torch
from hydra.errors import HydraException

from _harness import Point, chunk_batches, first_hit, interleave, plot_curves, run, train_config, write_md_json
from msnet.errors import MsnetError
from msnet.core import resolve_device, resolve_dtype
from msnet.data import num_batches, prepare_data
from msnet.runs import RunConsole
from msnet.runs.display import records_table
from msnet.methods.hierarchy import coarse_depths

DEFAULT = {"layers": 32, "channels": 8, "train_subset": 10000, "val_size": 2000, "epochs": 6, "eval_every": 10,
           "batch_size": 128, "method": "both", "lr": 2e-3, "levels": 3, "radius": 0.1, "nest": None}
QUICK = {"layers": 64, "channels": 4, "train_subset": 256, "val_size": 500, "epochs": 20, "eval_every": 1,
         "batch_size": 0, "method": "rmtr", "lr": 4e-3, "baseline_lrs": "2e-3,4e-3,8e-3", "levels": 4, "radius": 1.0,
         "nest": 16}
"""The presets; a flag given explicitly wins. QUICK is the best regime of the 2026-12-02 map at a size that trains in
about two minutes: full batch of 256 images, 64 layers x 4 channels, RMTR (4 levels, radius 1.0) started from the
16-layer network (nested iteration, ``--nest 16``) against Adam tuned over 2e-3, 4e-3, 8e-3 (measured: 1.36-1.63x
fewer FGE, 1.26-1.58x less wall time over three seeds; 128 and 256 layers: docs/results.md)."""


def nested(start: int, layers: int, budget_epochs: int) -> List[str]:
    """The overrides that start a multilevel run on a ``start``-layer network and double it to ``layers``
    (nested iteration, the F-cycle schedule): 2 epochs at ``start`` layers, 1 at each deeper shallow depth, then
    up to ``budget_epochs`` at the full depth (``depth.sizing=cost``: an epoch at d layers costs d / layers)."""
    if start < 1 or layers % start or (layers // start) & (layers // start - 1) or start == layers:
        raise MsnetError(f"--nest {start} must be --layers {layers} divided by a power of two (2, 4, ...)")
    depths, d = [], start
    while d < layers:
        depths.append(d)
        d *= 2
    shares = [2 * start / layers] + [d / layers for d in depths[1:]]
    return ["+depth=doubling", f"depth.start={start}", f"depth.stop={layers}", "depth.sizing=cost",
            "depth.epochs=[" + ",".join(f"{x:g}" for x in shares) + f",{budget_epochs}]"]


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring), the preset filled in."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"the smaller preset: {QUICK}")
    ap.add_argument("--method", default=None, choices=["mgopt", "rmtr", "both"])
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--layers", type=int, default=None, help=f"default {DEFAULT['layers']}")
    ap.add_argument("--channels", type=int, default=None, help=f"default {DEFAULT['channels']}")
    ap.add_argument("--T", type=float, default=1.0)
    ap.add_argument("--train-subset", type=int, default=None, help=f"default {DEFAULT['train_subset']}")
    ap.add_argument("--val-size", type=int, default=None, help=f"default {DEFAULT['val_size']}")
    ap.add_argument("--epochs", type=int, default=None, help=f"single-level epochs, its work budget "
                    f"(default {DEFAULT['epochs']})")
    ap.add_argument("--budget-factor", type=float, default=1.5, help="multilevel work budget / single-level work")
    ap.add_argument("--eval-every", type=int, default=None,
                    help=f"batches (cycles) between validations (default {DEFAULT['eval_every']})")
    ap.add_argument("--batch-size", type=int, default=None, help="mini-batch size; 0: the whole training set")
    ap.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    ap.add_argument("--lr", type=float, default=None, help=f"MG/OPT's smoother learning rate (default {DEFAULT['lr']})")
    ap.add_argument("--baseline-lrs", default=None, help="single-level learning rates (default: lr x 0.5, 1, 2)")
    ap.add_argument("--levels", type=int, default=None, help=f"default {DEFAULT['levels']}")
    ap.add_argument("--cycle", default="V")
    ap.add_argument("--nu1", type=int, default=0)
    ap.add_argument("--nu2", type=int, default=0)
    ap.add_argument("--coarse-steps", type=int, default=4)
    ap.add_argument("--coarse-lr-factor", type=float, default=1.0)
    ap.add_argument("--line-search", default="none")
    ap.add_argument("--radius", type=float, default=None, help=f"RMTR's initial fine radius (default {DEFAULT['radius']})")
    ap.add_argument("--window-max", type=int, default=4, help="RMTR's largest sample, in mini-batches")
    ap.add_argument("--extra", nargs="*", default=[],
                    help="overrides for every run, the baselines included (e.g. model.init_knots=8)")
    ap.add_argument("--nest", type=int, default=None,
                    help="nested iteration: start MG/OPT and RMTR on a network of NEST layers (--layers over a power "
                         "of two), 2 epochs there and 1 at each deeper shallow depth, counted at their cost")
    ap.add_argument("--no-nest", action="store_true", help="no nested iteration (to undo --quick's --nest 16)")
    ap.add_argument("--mgopt-extra", nargs="*", default=[], help="more overrides for the MG/OPT run")
    ap.add_argument("--rmtr-extra", nargs="*", default=[], help="more overrides for the RMTR run")
    ap.add_argument("--cascade-extra", nargs="*", default=None,
                    help="also run single-level training at --lr with these overrides (e.g. +depth=doubling ...): "
                         "the control for a nested-iteration run, its work counted at each depth's cost")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="folder for bench_mgopt.png and bench_mgopt.json")
    args = ap.parse_args()
    for key, value in (QUICK if args.quick else DEFAULT).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.no_nest:
        args.nest = None
    if args.nest:
        nested(args.nest, args.layers, 1)  # a bad --nest fails here, before any data is loaded
    try:
        args.baseline_lrs = ([float(x) for x in args.baseline_lrs.split(",")] if args.baseline_lrs
                             else [args.lr * f for f in (0.5, 1.0, 2.0)])
    except ValueError as err:
        raise MsnetError(f"--baseline-lrs takes comma-separated numbers ({err})") from None
    return args


def configs(args: argparse.Namespace, batch: int) -> Dict[str, Any]:
    """The composed configs of every run, by label: ``single lr X`` for each baseline LR, then the methods."""
    shared = [f"dataset={args.dataset}", f"dataset.train_subset={args.train_subset}",
              f"dataset.val_size={args.val_size}", "dataset.test_subset=0", f"model.channels={args.channels}",
              f"model.layers={args.layers}", f"model.T={args.T}", f"optimizer={args.optimizer}",
              "optimizer.scheduler=constant", f"trainer.batch_size={batch}", "trainer.progress=false",
              "trainer.eval_at_start=true", "trainer.eval_batch_size=1000", f"seed={args.seed}", *args.extra]
    out = {f"single lr {lr:g}": train_config([*shared, f"optimizer.lr={lr}", f"trainer.epochs={args.epochs}"])
           for lr in args.baseline_lrs}
    budget_epochs = math.ceil(args.budget_factor * args.epochs)
    ml_epochs = f"trainer.epochs={budget_epochs}"
    nest = nested(args.nest, args.layers, budget_epochs) if args.nest else []
    if args.method in ("mgopt", "both"):
        out["MG/OPT"] = train_config([
            *shared, f"optimizer.lr={args.lr}", "trainer=mgopt", ml_epochs, f"trainer.levels={args.levels}",
            f"trainer.cycle={args.cycle}", f"trainer.nu1={args.nu1}", f"trainer.nu2={args.nu2}",
            f"trainer.coarse_steps={args.coarse_steps}", f"trainer.coarse_lr_factor={args.coarse_lr_factor}",
            f"trainer.line_search={args.line_search}", "trainer.cycle_loss=false", *nest, *args.mgopt_extra])
    if args.method in ("rmtr", "both"):
        out["RMTR"] = train_config([*shared, "trainer=rmtr", ml_epochs, f"trainer.levels={args.levels}",
                                    f"trainer.radius={args.radius}", f"trainer.window_max={args.window_max}",
                                    *nest, *args.rmtr_extra])
    if args.cascade_extra is not None:
        out["cascade"] = train_config([*shared, f"optimizer.lr={args.lr}", ml_epochs, *args.cascade_extra])
    return out


def traced(label: str, state: Any, points: Iterator[Point], budget_fge: float,
           trace: List[Dict[str, Any]], fine_layers: int, batch0: int) -> Iterator[None]:
    """Append each evaluation to ``trace`` with the work so far (a multilevel rule's count, else 1 FGE per batch),
    yielding after each; stop once ``budget_fge`` is spent.

    The work is summed in increments, each scaled to fine-gradient equivalents of a ``batch0`` mini-batch at the full
    depth: times the point's depth / ``fine_layers`` (a gradient of d layers costs d / fine_layers FGE; nested
    iteration, a multilevel run with ``+depth=doubling`` in its extra overrides, builds a new rule with a count of
    its own at each depth) and times the chunk's images per mini-batch / ``batch0`` (a growing batch,
    ``trainer.batch_growth``: a gradient of a batch twice as large costs twice as much; a partial batch less)."""
    fge, rule, work, batches = 0.0, None, 0.0, 0
    for p in points:
        scale = p["layers"] / fine_layers * p["batch"] / batch0
        if not hasattr(state.rule, "work_fge"):  # one gradient of the current depth and batch per batch
            fge, batches = fge + (p["batches"] - batches) * scale, p["batches"]
        else:
            if state.rule is not rule:  # a new depth level: its rule counts from zero
                rule, work = state.rule, 0.0
            now = float(state.rule.work_fge)
            fge, work = fge + (now - work) * scale, now
        trace.append({"run": label, "batches": p["batches"], "epochs": p["epoch"], "fge": fge,
                      "train_s": p["train_s"], "val_acc": p["val_acc"], "layers": p["layers"], "batch": p["batch"]})
        yield
        if fge >= budget_fge - 1e-9:
            return


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    probe = train_config([f"dataset={args.dataset}", f"dataset.train_subset={args.train_subset}",
                          f"dataset.val_size={args.val_size}", "dataset.test_subset=0"])
    data = prepare_data(probe.dataset, resolve_device(probe.device), resolve_dtype(probe.dtype))
    n = data.sizes()["train"]
    batch = args.batch_size or n
    cfgs = configs(args, batch)
    per_epoch = num_batches(n, batch)
    evals = max(1, round(per_epoch / args.eval_every))
    budget = args.epochs * n / batch  # the single runs' work: every image once an epoch, in FGE of a first mini-batch
    traces: Dict[str, List[Dict[str, Any]]] = {label: [] for label in cfgs}
    runs = []
    for label, cfg in cfgs.items():
        state, pts = run(cfg, data, evals)
        runs.append(traced(label, state, pts, budget if label.startswith("single") else args.budget_factor * budget,
                           traces[label], args.layers, batch))
    console = RunConsole()
    console.console.width = max(console.console.width, 150)  # the result table has ten columns
    depths = [d[0] for d in coarse_depths([args.layers], args.levels)]  # steps per level, coarsest first
    mg = ""
    if "MG/OPT" in cfgs:  # read from the composed config: --mgopt-extra's overrides win over the flags
        m, o = cfgs["MG/OPT"].trainer, cfgs["MG/OPT"].optimizer
        mg = (f"MG/OPT {getattr(m.cycle, 'name', m.cycle)}-cycle {o.name} lr {o.lr:g}, nu1={m.nu1}, nu2={m.nu2}, coarse_steps={m.coarse_steps}, "
              f"coarse_lr_factor={m.coarse_lr_factor:g}, line_search={getattr(m.line_search, 'name', m.line_search)} {' '.join(args.mgopt_extra)}; ")
    tr = (f"RMTR radius {args.radius}, window_max {args.window_max} {' '.join(args.rmtr_extra)}; "
          if "RMTR" in cfgs else "")
    describe = (f"{args.dataset}, {n} training images ({per_epoch} batches of {batch}), validation "
                f"{data.x_val.shape[0]}; {args.channels} channels x {args.layers} layers, T={args.T}; single-level "
                f"{args.optimizer} lr {args.baseline_lrs} constant; levels {depths}; {mg}{tr}"
                f"{'all runs: ' + ' '.join(args.extra) + '; ' if args.extra else ''}"
                f"{f'multilevel nested from {args.nest} layers: ' + ' '.join(nested(args.nest, args.layers, 0)[1:-1]) + '; ' if args.nest else ''}"
                f"{torch.get_num_threads()} threads")
    console.print(describe)
    console.print(f"single-level: {args.epochs} epochs = {budget:.0f} FGE; multilevel: up to "
                  f"{args.budget_factor * budget:.0f} FGE; interleaved in {evals} chunks per epoch ...")
    interleave(*runs)
    report(console, args, traces, describe, evals)


def report(console: RunConsole, args: argparse.Namespace, traces: Dict[str, List[Dict[str, Any]]], describe: str,
           evals: int) -> None:
    """The table of every run's work and time to the target, then the ratios baseline / method as the last lines."""
    singles = [k for k in traces if k.startswith("single")]
    plateaus = {k: sum(r["val_acc"] for r in traces[k][-3:]) / len(traces[k][-3:]) for k in singles}
    best_lr = max(plateaus, key=plateaus.get)
    target = plateaus[best_lr] - 0.005
    # a nested-iteration run reaches the target only at the full depth, as bench_depth counts the cascade
    hits = {k: first_hit([r for r in t if r["layers"] == args.layers], target) for k, t in traces.items()}
    reached = [k for k in singles if hits[k]]
    base = min(reached, key=lambda k: (hits[k]["fge"], hits[k]["train_s"])) if reached else None
    rows = []
    for label, trace in traces.items():
        hit = hits[label]
        rows.append({
            "run": label + (" (baseline)" if label == base else ""),
            "best_val_acc": f"{max(r['val_acc'] for r in trace):.2%}", "final_val_acc": f"{trace[-1]['val_acc']:.2%}",
            "time_to_target_s": round(hit["train_s"], 1) if hit else None,
            "fge_to_target": round(hit["fge"], 1) if hit else None,
            "epochs_to_target": round(hit["epochs"], 2) if hit else None, "total_s": round(trace[-1]["train_s"], 1),
            "total_fge": round(trace[-1]["fge"], 1), "fge_per_batch": round(trace[-1]["fge"] / max(1, trace[-1]["batches"]), 2),
        })
    console.print(records_table(f"to {target:.2%} validation accuracy (best single-level plateau, {best_lr}: "
                                f"{plateaus[best_lr]:.2%}, - 0.5 points)",
                                [{k: f"{v:g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows],
                                list(rows[0])))
    if args.out:
        written = write_md_json(args.out, "bench_mgopt", None, {"args": vars(args), "evals_per_epoch": evals,
                                                                "target": target, "traces": traces, "rows": rows})
        png = written[0].with_suffix(".png")
        drawn = plot_curves(traces, target, png, describe,
                            [("fge", "work (fine-gradient equivalents)"), ("train_s", "training wall time (s)")])
        console.print(f"written: {png if drawn else ''} {written[0]}")
    for label in (k for k in traces if not k.startswith("single")):
        m = hits[label]
        if base is None or m is None:
            console.print(f"{label}: {'no single-level run' if base is None else label} did not reach the target "
                          f"within its budget: ratios undefined" + ("" if m else f" (FGE ratio < 1/{args.budget_factor:g})"))
        else:
            s = hits[base]
            console.print(f"{label}: FGE ratio {base} / {label} = {s['fge'] / m['fge']:.2f} (goal >= 3); "
                          f"wall-time ratio = {s['train_s'] / m['train_s']:.2f} (goal >= 2)")


if __name__ == "__main__":
    try:
        main()
    except (MsnetError, HydraException) as err:  # a bad flag or override: one line, no traceback
        raise SystemExit(f"bench_mgopt: error: {str(err).splitlines()[0]}")

#!/usr/bin/env python
"""MG/OPT (trainer=mgopt) against single-level training: work and wall time to a target accuracy.

In one process, on the same data (same batches in the same order), the same network (same
initial weights) and the same smoother (Adam, constant learning rate), each configured and
trained as ``msnet train`` would (its config groups, and its level loop
``msnet.training.fit.run_levels`` through ``scripts/bench/_harness.py``):

* single: ``msnet train`` (one Adam step per mini-batch, msnet's FirstOrder rule), ``--epochs`` epochs;
* mgopt: ``msnet train trainer=mgopt`` (one MG/OPT cycle per mini-batch, msnet.training.mgopt.MGOpt,
  settings from the flags), stopped once it has spent ``--budget-factor`` times the single run's work.

Work is counted in fine-gradient equivalents (FGE; msnet.training.mgopt's docstring): the single
run spends 1 FGE per batch, an MG/OPT cycle what its levels' gradients and forward passes cost.
Validation accuracy is measured before training and about every ``--eval-every`` batches
(cycles): the loop splits each epoch into round(batches per epoch / eval-every) chunks, and the
MG/OPT run stops at the end of the chunk that reaches its budget. Evaluation is excluded from the
clocks and from the work. The two runs advance in turns, chunk by chunk, so that noise from
other work on the machine hits both alike. The target is the single run's plateau (the mean
of its last three evaluations) minus 0.5 points; the script prints, for each run, the wall time,
the FGE and the epochs to reach it, and the ratios single / mgopt (goals: >= 3 in FGE, >= 2 in
wall time). With ``--out DIR`` it writes DIR/bench_mgopt.png (validation accuracy against work
and against wall time) and DIR/bench_mgopt.json (both traces).

    .venv/bin/python scripts/bench/bench_mgopt.py                 # default: 32 layers, ~20 min on 2 CPU cores
    .venv/bin/python scripts/bench/bench_mgopt.py --quick         # 16 layers, 2,560 images: ~2 min
    .venv/bin/python scripts/bench/bench_mgopt.py --levels 3 --nu1 0 --nu2 0 --coarse-steps 8 --out outputs/bench_mgopt
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Dict, Iterator, List

import torch
from hydra.errors import HydraException

from _harness import Point, chunk_batches, first_hit, interleave, plot_curves, run, train_config, write_md_json
from msnet import MsnetError
from msnet.core import resolve_device, resolve_dtype
from msnet.data import num_batches, prepare_data
from msnet.runs import RunConsole
from msnet.runs.display import records_table
from msnet.training.mgopt import coarse_depths

DEFAULT = {"layers": 32, "channels": 8, "train_subset": 10000, "val_size": 2000, "epochs": 6, "eval_every": 10}
QUICK = {"layers": 16, "channels": 4, "train_subset": 2560, "val_size": 1000, "epochs": 3, "eval_every": 5}


def traced(label: str, state: Any, points: Iterator[Point], budget_fge: float,
           trace: List[Dict[str, Any]]) -> Iterator[None]:
    """Append each evaluation to ``trace`` with the work so far (MG/OPT's count, else 1 FGE per batch), yielding
    after each; stop once ``budget_fge`` is spent."""
    for p in points:
        fge = float(getattr(state.rule, "work_fge", p["batches"]))  # MG/OPT counts its cycles' work; Adam: 1 per batch
        trace.append({"run": label, "batches": p["batches"], "epochs": p["epoch"], "fge": fge,
                      "train_s": p["train_s"], "val_acc": p["val_acc"]})
        yield
        if fge >= budget_fge - 1e-9:
            return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"the smaller preset: {QUICK}")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--layers", type=int, default=None, help=f"default {DEFAULT['layers']}")
    ap.add_argument("--channels", type=int, default=None, help=f"default {DEFAULT['channels']}")
    ap.add_argument("--T", type=float, default=1.0)
    ap.add_argument("--train-subset", type=int, default=None, help=f"default {DEFAULT['train_subset']}")
    ap.add_argument("--val-size", type=int, default=None, help=f"default {DEFAULT['val_size']}")
    ap.add_argument("--epochs", type=int, default=None,
                    help=f"single-level epochs, its work budget (default {DEFAULT['epochs']})")
    ap.add_argument("--budget-factor", type=float, default=1.5, help="MG/OPT work budget / single-level work")
    ap.add_argument("--eval-every", type=int, default=None,
                    help=f"batches (cycles) between validations (default {DEFAULT['eval_every']})")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--cycle", default="V")
    ap.add_argument("--nu1", type=int, default=0)
    ap.add_argument("--nu2", type=int, default=0)
    ap.add_argument("--coarse-steps", type=int, default=4)
    ap.add_argument("--coarse-lr-factor", type=float, default=1.0)
    ap.add_argument("--line-search", default="none")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="folder for bench_mgopt.png and bench_mgopt.json")
    args = ap.parse_args()
    for key, value in (QUICK if args.quick else DEFAULT).items():  # flags given explicitly win
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)

    shared = [f"dataset={args.dataset}", f"dataset.train_subset={args.train_subset}",
              f"dataset.val_size={args.val_size}", "dataset.test_subset=0", f"model.channels={args.channels}",
              f"model.layers={args.layers}", f"model.T={args.T}", f"optimizer={args.optimizer}",
              f"optimizer.lr={args.lr}", "optimizer.scheduler=constant", f"trainer.batch_size={args.batch_size}",
              "trainer.progress=false", "trainer.eval_at_start=true", "trainer.eval_batch_size=1000",
              f"seed={args.seed}"]
    single_cfg = train_config([*shared, f"trainer.epochs={args.epochs}"])
    mg_cfg = train_config([*shared, "trainer=mgopt", f"trainer.epochs={math.ceil(args.budget_factor * args.epochs)}",
                           f"trainer.levels={args.levels}", f"trainer.cycle={args.cycle}", f"trainer.nu1={args.nu1}",
                           f"trainer.nu2={args.nu2}", f"trainer.coarse_steps={args.coarse_steps}",
                           f"trainer.coarse_lr_factor={args.coarse_lr_factor}",
                           f"trainer.line_search={args.line_search}", "trainer.cycle_loss=false"])
    data = prepare_data(single_cfg.dataset, resolve_device(single_cfg.device), resolve_dtype(single_cfg.dtype))
    n = data.sizes()["train"]
    per_epoch = num_batches(n, args.batch_size)
    evals = max(1, round(per_epoch / args.eval_every))
    budget = float(args.epochs * sum(chunk_batches(n, evals, args.batch_size)))  # the single run's batches
    single_state, single_points = run(single_cfg, data, evals)
    mg_state, mg_points = run(mg_cfg, data, evals)

    console = RunConsole()
    console.console.width = max(console.console.width, 150)  # the result table has ten columns
    depths = [d[0] for d in coarse_depths(mg_state.model.depth(), args.levels)]  # steps per level, coarsest first
    describe = (f"{args.dataset}, {data.x_train.shape[0]} training images ({per_epoch} batches of {args.batch_size}), "
                f"validation {data.x_val.shape[0]}; {args.channels} channels x {args.layers} layers, T={args.T}; "
                f"{args.optimizer} lr {args.lr} constant; MG/OPT {args.cycle}-cycle, levels {depths}, nu1={args.nu1}, "
                f"nu2={args.nu2}, coarse_steps={args.coarse_steps}, coarse_lr_factor={args.coarse_lr_factor}, "
                f"line_search={args.line_search}; {torch.get_num_threads()} threads")
    console.print(describe)
    console.print(f"single-level: {args.epochs} epochs = {budget:.0f} FGE; MG/OPT: up to {args.budget_factor * budget:.0f} "
                  f"FGE; interleaved in {evals} chunks per epoch (about {per_epoch / evals:.0f} batches each) ...")
    traces: Dict[str, List[Dict[str, Any]]] = {"single-level": [], "MG/OPT": []}
    interleave(traced("single-level", single_state, single_points, budget, traces["single-level"]),
               traced("MG/OPT", mg_state, mg_points, args.budget_factor * budget, traces["MG/OPT"]))

    plateau = sum(r["val_acc"] for r in traces["single-level"][-3:]) / 3
    target = plateau - 0.005
    hits = {k: first_hit(t, target) for k, t in traces.items()}
    rows = []
    for label, trace in traces.items():
        hit = hits[label]
        rows.append({
            "run": label, "best_val_acc": f"{max(r['val_acc'] for r in trace):.2%}",
            "final_val_acc": f"{trace[-1]['val_acc']:.2%}",
            "time_to_target_s": hit["train_s"] if hit else None, "fge_to_target": hit["fge"] if hit else None,
            "epochs_to_target": hit["epochs"] if hit else None,
            "total_s": trace[-1]["train_s"], "total_fge": trace[-1]["fge"], "epochs": trace[-1]["epochs"],
        })
    console.print(records_table(f"to {target:.2%} validation accuracy (single-level plateau {plateau:.2%} - 0.5 points)",
                                rows, list(rows[0])))
    s, m = hits["single-level"], hits["MG/OPT"]
    if s is None or m is None:
        who = "single-level" if s is None else "MG/OPT"
        console.print(f"{who} did not reach the target within its budget: ratios undefined"
                      + (" (MG/OPT needs more than the budget, i.e. FGE ratio < 1/budget-factor)" if m is None else ""))
    else:
        console.print(f"FGE ratio single / MG/OPT = {s['fge'] / m['fge']:.2f}  (goal >= 3)")
        console.print(f"wall-time ratio single / MG/OPT = {s['train_s'] / m['train_s']:.2f}  (goal >= 2)")
        console.print(f"epochs to target: single {s['epochs']:.2f}, MG/OPT {m['epochs']:.2f}; "
                      f"MG/OPT cost per batch {traces['MG/OPT'][-1]['fge'] / traces['MG/OPT'][-1]['batches']:.2f} FGE")
    if args.out:
        written = write_md_json(args.out, "bench_mgopt", None, {"args": vars(args), "evals_per_epoch": evals,
                                                                "target": target, "traces": traces, "rows": rows})
        png = written[0].with_suffix(".png")
        if plot_curves(traces, target, png, describe,
                       [("fge", "work (fine-gradient equivalents)"), ("train_s", "training wall time (s)")]):
            console.print(f"written: {png}, {written[0]}")
        else:
            console.print(f"written: {written[0]} (no plot: pip install 'msnet[plot]')")


if __name__ == "__main__":
    try:
        main()
    except (MsnetError, HydraException) as err:  # a bad flag or override: one line, no traceback
        raise SystemExit(f"bench_mgopt: error: {str(err).splitlines()[0]}")

#!/usr/bin/env python
"""MG/OPT (trainer=mgopt) against single-level training: work and wall time to a target accuracy.

In one process, on the same data (same batches in the same order), the same network (same
initial weights) and the same smoother (Adam, constant learning rate):

* single: one Adam step per mini-batch (msnet's FirstOrder rule), ``--epochs`` epochs;
* mgopt: one MG/OPT cycle per mini-batch (msnet.train.mgopt.MGOpt, settings from the flags),
  until it has spent ``--budget-factor`` times the single run's work.

Work is counted in fine-gradient equivalents (FGE; msnet.train.mgopt's docstring): the single
run spends 1 FGE per batch, an MG/OPT cycle what its levels' gradients and forward passes cost.
Validation accuracy is measured every ``--eval-every`` batches (cycles); evaluation is excluded
from the clocks and from the work. The two runs advance in turns, chunk by chunk, so that noise
from other work on the machine hits both alike. The target is the single run's plateau (the mean
of its last three evaluations) minus 0.5 points; the script prints, for each run, the wall time,
the FGE and the epochs to reach it, and the ratios single / mgopt (goals: >= 3 in FGE, >= 2 in
wall time). With ``--out DIR`` it writes DIR/bench_mgopt.png (validation accuracy against work
and against wall time) and DIR/bench_mgopt.json (both traces).

    .venv/bin/python scripts/bench_mgopt.py                 # default: 32 layers, ~20 min on 2 CPU cores
    .venv/bin/python scripts/bench_mgopt.py --quick         # 16 layers, 2,560 images: ~2 min
    .venv/bin/python scripts/bench_mgopt.py --levels 3 --nu1 0 --nu2 0 --coarse-steps 8 --out outputs/bench_mgopt
"""

from __future__ import annotations

import argparse
import copy
import json
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch
from omegaconf import OmegaConf

from msnet.config import DatasetConfig
from msnet.core import ModelSpec, StageSpec, build_model
from msnet.data import batches, num_batches, prepare_data
from msnet.runs import RunConsole
from msnet.runs.display import records_table
from msnet.train.loop import evaluate
from msnet.config import MGOptConfig
from msnet.train.mgopt import MGOpt, mgopt_settings
from msnet.train.optim import build_optimizer
from msnet.train.updates import FirstOrder, UpdateRule

DEFAULT = {"layers": 32, "channels": 8, "train_subset": 10000, "val_size": 2000, "epochs": 6, "eval_every": 10}
QUICK = {"layers": 16, "channels": 4, "train_subset": 2560, "val_size": 1000, "epochs": 3, "eval_every": 5}
NO_REG = OmegaConf.create({"classifier_smoothness": 0.0, "stencil_smoothness": 0.0})


def run(label: str, model: torch.nn.Module, rule: UpdateRule, data: Any, args: argparse.Namespace,
        budget_fge: float, trace: List[Dict[str, Any]]) -> Iterator[None]:
    """Train until ``budget_fge`` is spent, evaluating every ``args.eval_every`` batches; yields after each."""
    g = torch.Generator().manual_seed(args.seed)
    per_epoch = num_batches(data.x_train.shape[0], args.batch_size)
    clock, work, done = 0.0, 0.0, 0
    trace.append({"run": label, "batches": 0, "epochs": 0.0, "fge": 0.0, "train_s": 0.0,
                  "val_acc": evaluate(model, data.x_val, data.y_val, 1000)["acc"]})
    while work < budget_fge - 1e-9:
        for xb, yb in batches(data.x_train, data.y_train, args.batch_size, g, shuffle=True):
            model.train()
            t0 = time.perf_counter()
            out = rule.step(xb, yb)
            clock += time.perf_counter() - t0
            work += out.info["work_fge"] if out.info else 1.0
            done += 1
            if done % args.eval_every == 0 or work >= budget_fge - 1e-9:
                acc = evaluate(model, data.x_val, data.y_val, 1000)["acc"]
                trace.append({"run": label, "batches": done, "epochs": done / per_epoch, "fge": work,
                              "train_s": clock, "val_acc": acc})
                yield
            if work >= budget_fge - 1e-9:
                return
        rule.end_epoch()


def first_hit(trace: List[Dict[str, Any]], target: float) -> Optional[Dict[str, Any]]:
    return next((r for r in trace if r["val_acc"] >= target), None)


def plot(traces: Dict[str, List[Dict[str, Any]]], target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for label, trace in traces.items():
        axes[0].plot([r["fge"] for r in trace], [100 * r["val_acc"] for r in trace], label=label)
        axes[1].plot([r["train_s"] for r in trace], [100 * r["val_acc"] for r in trace], label=label)
    for ax, xlabel in zip(axes, ("work (fine-gradient equivalents)", "training wall time (s)")):
        ax.axhline(100 * target, color="grey", ls="--", lw=0.8, label=f"target {100 * target:.2f}%")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation accuracy (%)")
        lo = min(100 * r["val_acc"] for t in traces.values() for r in t[len(t) // 5:])
        ax.set_ylim(max(0, lo - 2), None)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(textwrap.fill(title, 150), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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

    data = prepare_data(OmegaConf.structured(DatasetConfig(name=args.dataset, download=False, val_size=args.val_size,
                                                           train_subset=args.train_subset)), torch.device("cpu"))
    spec = ModelSpec(data.in_channels, data.num_classes, data.image_size, [StageSpec(args.channels, args.layers, args.T)])
    opt_cfg = OmegaConf.create({"name": args.optimizer, "lr": args.lr, "beta1": 0.9, "beta2": 0.999, "momentum": 0.9,
                                "nesterov": False, "weight_decay": 0.0, "scheduler": "constant"})
    settings = MGOptConfig(levels=args.levels, cycle=args.cycle, nu1=args.nu1, nu2=args.nu2,
                             coarse_steps=args.coarse_steps, coarse_lr_factor=args.coarse_lr_factor,
                             line_search=args.line_search, cycle_loss=False)
    mgopt_settings(OmegaConf.structured(settings))  # the same checks as trainer=mgopt
    torch.manual_seed(args.seed)
    single_net = build_model(spec)
    mg_net = copy.deepcopy(single_net)
    single_rule = FirstOrder(single_net, build_optimizer(single_net.parameters(), opt_cfg))
    mg_rule = MGOpt(mg_net, settings, opt_cfg, NO_REG, args.epochs, None)
    per_epoch = num_batches(data.x_train.shape[0], args.batch_size)
    budget = float(args.epochs * per_epoch)

    console = RunConsole()
    console.console.width = max(console.console.width, 150)  # the result table has ten columns
    depths = [lv.net.depth()[0] for lv in mg_rule.levels]
    describe = (f"{args.dataset}, {data.x_train.shape[0]} training images ({per_epoch} batches of {args.batch_size}), "
                f"validation {data.x_val.shape[0]}; {args.channels} channels x {args.layers} layers, T={args.T}; "
                f"{args.optimizer} lr {args.lr} constant; MG/OPT {args.cycle}-cycle, levels {depths}, nu1={args.nu1}, "
                f"nu2={args.nu2}, coarse_steps={args.coarse_steps}, coarse_lr_factor={args.coarse_lr_factor}, "
                f"line_search={args.line_search}; {torch.get_num_threads()} threads")
    console.print(describe)
    console.print(f"single-level: {args.epochs} epochs = {budget:.0f} FGE; MG/OPT: up to {args.budget_factor * budget:.0f} "
                  f"FGE; interleaved in chunks of {args.eval_every} batches ...")
    traces: Dict[str, List[Dict[str, Any]]] = {"single-level": [], "MG/OPT": []}
    active = [run("single-level", single_net, single_rule, data, args, budget, traces["single-level"]),
              run("MG/OPT", mg_net, mg_rule, data, args, args.budget_factor * budget, traces["MG/OPT"])]
    while active:
        for r in list(active):
            try:
                next(r)
            except StopIteration:
                active.remove(r)

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
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_mgopt.json").write_text(json.dumps({"args": vars(args), "target": target, "traces": traces,
                                                          "rows": rows}, indent=1))
        try:
            plot(traces, target, out / "bench_mgopt.png", describe)
            console.print(f"written: {out / 'bench_mgopt.png'}, {out / 'bench_mgopt.json'}")
        except ImportError:
            console.print(f"written: {out / 'bench_mgopt.json'} (no plot: pip install 'msnet[plot]')")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Coarse-to-fine (pyramid) training against single-level fine training: wall time to a target.

In one process, on the same data and network, each configured from msnet's own config
groups exactly as ``msnet train OVERRIDES`` would be (so any optimiser works, the paper's
BCD included: ``experiment=bcd_fashion``):

* pyramid: ``msnet train +pyramid=2level OVERRIDES`` (``--pyramid 3level`` for three levels):
  its per-level epochs (default [2, 1]: 2 epochs on images restricted once by Gaussian
  smoothing and R, then 1 at full resolution) and learning rates, the stencils and
  classifier prolonged between levels (msnet.multigrid; with ``pyramid.stencils=fit``, as in
  ``2level_block``, the stencils refitted on sample images, timed as training), a fresh update
  rule (and lr schedule) per level;
* single: ``msnet train OVERRIDES`` at full resolution for as many epochs as the pyramid has
  in all levels (the same epoch budget; ``--epochs`` changes it).

Both are trained by the trainer's own level loop (``msnet.training.fit.run_levels``, through
``scripts/bench/_harness.py``), so the pyramid's levels, moves and per-level rules are the ones
``msnet train`` runs. Validation accuracy is measured every ``1/--evals-per-epoch`` of an epoch,
and for the pyramid right after each prolongation; evaluation time is excluded from the clocks
(the moves and stencil fits count), and the two runs advance in turns, chunk by chunk, so that
noise from other work on the machine hits both alike. The target is the
single-level run's final validation accuracy minus 0.5 points (only evaluations at full
resolution count for the pyramid); the script prints each run's training wall time to reach it
and the ratio pyramid / single (goal <= 0.6; the paper saw 0.74 on ImageNet-10), and writes
the table and curves to ``--out``. Validation accuracy under Adam at lr 2e-3 moves by about a
point between evaluations, so the first crossing of the target is noisy: ``--seeds 0,1,2`` runs
one interleaved pair per seed and reports every ratio and their median.

    .venv/bin/python scripts/bench/bench_pyramid.py --train-subset 20000                 # Adam (msnet's default)
    .venv/bin/python scripts/bench/bench_pyramid.py --pyramid 2level_block --train-subset 20000 --seeds 0,1,2
    .venv/bin/python scripts/bench/bench_pyramid.py --train-subset 20000 experiment=bcd_fashion   # the paper's BCD
    .venv/bin/python scripts/bench/bench_pyramid.py pyramid.epochs=[4,2] --epochs 4     # any override
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from hydra.errors import HydraException
from omegaconf import DictConfig

from _harness import Point, first_hit, interleave, markdown_table, run, train_config, write_md_json
from msnet.errors import MsnetError
from msnet.core import resolve_device, resolve_dtype
from msnet.data import prepare_data
from msnet.runs import RunConsole
from msnet.runs.display import records_table
from msnet.training.schedule import Level, build_schedule
from msnet.training.setup import model_spec


def single_config(cfg: DictConfig, epochs: int) -> DictConfig:
    """The pyramid run's config without its pyramid: ``epochs`` epochs at full resolution."""
    single = copy.deepcopy(cfg)
    single.pyramid = None
    single.trainer.epochs = epochs
    single.trainer.eval_at_start = False
    return single


def traced(points: Iterator[Point], trace: List[Dict[str, Any]], label: Optional[str] = None) -> Iterator[None]:
    """Append each evaluation to ``trace`` as it comes, yielding after each: as ``label`` (a one-level run), or
    as its level and ``down`` with each level after the first also evaluated right after the move onto it
    (``trainer.eval_at_start``), as ``"NAME (prolonged)"``."""
    for i, p in enumerate(points):
        if p["kind"] == "level":
            if i == 0:  # the first level's, before any training: not part of the race
                continue
            trace.append({"run": f"{p['level']} (prolonged)", "down": p["down"], "train_s": p["train_s"],
                          "val_acc": p["val_acc"], "epoch": 0})
        else:
            trace.append({"run": label or p["level"], "train_s": p["train_s"], "val_acc": p["val_acc"],
                          "epoch": math.ceil(p["level_epoch"])})
            if label is None:
                trace[-1]["down"] = p["down"]
        yield


def bench_seed(cfg: DictConfig, levels: List[Level], data, epochs: int, evals: int,
               on_step: Callable[[int, Any], None]) -> Dict[str, Any]:
    """One seed: the single-level and pyramid runs of ``cfg``, interleaved chunk by chunk; their traces and times
    to target."""
    cfg = copy.deepcopy(cfg)
    cfg.trainer.eval_at_start = True  # the pyramid's accuracy right after each prolongation
    single, pyramid = [], []
    interleave(traced(run(single_config(cfg, epochs), data, evals)[1], single, "single"),
               traced(run(cfg, data, evals)[1], pyramid), on_step=on_step)
    target = single[-1]["val_acc"] - 0.005
    s = first_hit(single, target)
    p = first_hit([r for r in pyramid if r["down"] == 0], target)  # coarse levels' evaluations are on coarse images
    prolonged = [r for r in pyramid if r["run"].endswith("(prolonged)")]
    coarse_end = [r for r in pyramid if r["down"] == levels[-1].down + 1 and "prolonged" not in r["run"]]
    return {
        "seed": int(cfg.seed), "target": target, "single_final": single[-1]["val_acc"],
        "pyramid_final": pyramid[-1]["val_acc"], "single_train_s": single[-1]["train_s"],
        "pyramid_train_s": pyramid[-1]["train_s"], "single_to_target_s": s["train_s"] if s else None,
        "pyramid_to_target_s": p["train_s"] if p else None,
        "reached_in": None if p is None else f"{p['run']}, epoch {p['epoch']}",
        "before_last_prolongation": coarse_end[-1]["val_acc"] if coarse_end else None,
        "after_last_prolongation": prolonged[-1]["val_acc"] if prolonged else None,
        "ratio": None if p is None else p["train_s"] / s["train_s"],
        "curves": {"single": single, "pyramid": pyramid},
    }


def _pct(v):
    return "" if v is None else f"{v:.2%}"


def _s(v):
    return "not reached" if v is None else f"{v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pyramid", default="2level", help="the pyramid config (conf/pyramid/NAME.yaml)")
    ap.add_argument("--epochs", type=int, default=None, help="single-level epochs (default: the pyramid's total)")
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--evals-per-epoch", type=int, default=4)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; each seed is one interleaved pair of runs "
                    "(initialisation and batch order change, the data split does not), and the ratios are "
                    "summarised by their median (default: 0)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="outputs/bench/pyramid")
    ap.add_argument("overrides", nargs="*", help="msnet train overrides for both runs (default: optimizer=adam, "
                    "lr 2e-3, cosine schedule, batch 128), e.g. experiment=bcd_fashion or pyramid.epochs=[4,2]")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise MsnetError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise MsnetError("--seeds needs at least one seed, e.g. --seeds 0,1,2")

    shared = [f"dataset.train_subset={args.train_subset or 'null'}", "dataset.test_subset=0",
              f"model.channels={args.channels}", f"model.layers={args.layers}", "trainer.progress=false"]
    base = [*shared, f"+pyramid={args.pyramid}", *args.overrides]
    cfg = train_config(base)
    data = prepare_data(cfg.dataset, resolve_device(cfg.device), resolve_dtype(cfg.dtype))
    levels = build_schedule(cfg, data.image_size, len(model_spec(cfg.model, data).stages)).levels
    epochs = args.epochs or sum(lv.epochs for lv in levels)
    console = RunConsole()
    h, w = data.image_size
    plan = " -> ".join(f"{lv.epochs} ep at {h >> lv.down}x{w >> lv.down}" + (f" lr {lv.lr}" if lv.lr else "")
                       for lv in levels)
    setting = (f"{data.name}, {data.x_train.shape[0]} training images, {args.channels} channels x {args.layers} "
               f"layers, optimizer {cfg.optimizer.name} (lr {cfg.optimizer.lr}, {cfg.optimizer.scheduler}), batch "
               f"{cfg.trainer.batch_size}, pyramid {args.pyramid} (operator {cfg.pyramid.operator}, sigma "
               f"{cfg.pyramid.sigma}, stencils {cfg.pyramid.stencils}), overrides {args.overrides}, seeds {seeds}, {torch.get_num_threads()} threads")
    console.print(f"{setting}\nsingle-level: {epochs} epochs at {h}x{w}; pyramid {args.pyramid}: {plan}; "
                  "interleaved chunk by chunk ...")

    evaluations = args.evals_per_epoch * (epochs + sum(lv.epochs for lv in levels)) + len(levels) - 1
    results = []
    with console.progress(True) as progress:
        for seed in seeds:
            task = progress.add_task(f"seed {seed}", total=evaluations, loss="", acc="", ips="")

            def advanced(i: int, _: Any) -> None:
                progress.update(task, advance=1)
                progress.refresh()

            scfg = train_config([*base, f"seed={seed}"])
            results.append(bench_seed(scfg, levels, data, epochs, args.evals_per_epoch, advanced))

    rows = [{"seed": r["seed"], "target": _pct(r["target"]), "single final": _pct(r["single_final"]),
             "pyramid final": _pct(r["pyramid_final"]),
             "prolongation": f"{_pct(r['before_last_prolongation'])} -> {_pct(r['after_last_prolongation'])}",
             "single to target s": _s(r["single_to_target_s"]), "pyramid to target s": _s(r["pyramid_to_target_s"]),
             "ratio": "-" if r["ratio"] is None else f"{r['ratio']:.3f}"} for r in results]
    columns = list(rows[0])
    title = (f"training time to the single-level run's final validation accuracy - 0.5 points; single-level "
             f"{epochs} epochs at {h}x{w}, pyramid {'+'.join(str(lv.epochs) for lv in levels)}")
    console.print(records_table(title, rows, columns))
    ratios = [r["ratio"] for r in results]
    reached = [x for x in ratios if x is not None]
    lines = []
    if len(reached) < len(ratios):
        lines.append(f"pyramid did not reach the target in {len(ratios) - len(reached)} of {len(ratios)} seed(s) "
                     "(ratio undefined, counted as > 1 in the median)")
    med = statistics.median([x if x is not None else float("inf") for x in ratios])
    if med == float("inf"):
        lines.append("median ratio pyramid / single: undefined (the pyramid missed the target in most seeds)")
    else:
        spread = f", mean {statistics.mean(reached):.3f}, range {min(reached):.3f}-{max(reached):.3f}" if len(
            reached) > 1 else ""
        lines.append(f"median ratio pyramid / single = {med:.3f} over {len(ratios)} seed(s){spread}  (goal <= 0.6)")
    for line in lines:
        console.print(line)

    written = write_md_json(args.out, "bench_pyramid", [setting, "", title, "", *markdown_table(rows, columns), "", *lines],
                            {"setting": setting, "overrides": args.overrides, "pyramid": args.pyramid,
                             "levels": [lv.to_dict() for lv in levels], "single_epochs": epochs, "seeds": seeds,
                             "median_ratio": None if med == float("inf") else med, "results": results})
    console.print("written: " + ", ".join(map(str, written)))


if __name__ == "__main__":
    try:
        main()
    except (MsnetError, HydraException) as err:  # a bad override or config: one line, no traceback
        raise SystemExit(f"bench_pyramid: error: {str(err).splitlines()[0]}")

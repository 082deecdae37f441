#!/usr/bin/env python
"""Coarse-to-fine (pyramid) training against single-level fine training: wall time to a target.

In one process, on the same data and network, each configured from msnet's own config
groups exactly as ``msnet train OVERRIDES`` would be (so any optimiser works, the paper's
BCD included: ``experiment=bcd_fashion``):

* pyramid: ``msnet train +pyramid=2level OVERRIDES`` (``--pyramid 3level`` for three levels):
  its per-level epochs (default [2, 1]: 2 epochs on images restricted once by Gaussian
  smoothing and R, then 1 at full resolution) and learning rates, the stencils and
  classifier prolonged between levels (msnet.multigrid), a fresh update rule (and lr
  schedule) per level, as the trainer does;
* single: ``msnet train OVERRIDES`` at full resolution for as many epochs as the pyramid has
  in all levels (the same epoch budget; ``--epochs`` changes it).

Both use msnet's own ``build_schedule``, ``build_update``, ``train_epoch``, ``level_data`` and
``transfer_resolution``. Validation accuracy is measured every ``1/--evals-per-epoch`` of an
epoch; evaluation time is excluded from the clocks, and the two runs advance in turns, chunk by
chunk, so that noise from other work on the machine hits both alike. The target is the
single-level run's final validation accuracy minus 0.5 points (only evaluations at full
resolution count for the pyramid); the script prints each run's training wall time to reach it
and the ratio pyramid / single (goal <= 0.6; the paper saw 0.74 on ImageNet-10), and writes
the table and curves to ``--out``.

    .venv/bin/python scripts/bench_pyramid.py --train-subset 20000                 # Adam (msnet's default)
    .venv/bin/python scripts/bench_pyramid.py --train-subset 20000 experiment=bcd_fashion   # the paper's BCD
    .venv/bin/python scripts/bench_pyramid.py pyramid.epochs=[4,2] --epochs 4     # any override
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf

from msnet import MsnetError
from msnet.config import compose_config
from msnet.core import build_model, resolve_device
from msnet.data import prepare_data
from msnet.multigrid import transfer_resolution
from msnet.runs import RunConsole
from msnet.runs.display import records_table
from msnet.train.loop import evaluate, train_epoch
from msnet.train.regularizers import build_regularizer
from msnet.train.schedule import build_schedule, level_data
from msnet.train.setup import model_spec, resolve_dtype, set_seed
from msnet.train.updates import build_update


def run_level(model, cfg, opt_cfg, data, epochs, evals, g, trace, clock, label):
    """Train ``epochs`` epochs in ``evals`` chunks each, yielding after every chunk.

    Appends (train seconds, val acc) to ``trace``; returns the model at the end.
    """
    update = build_update(model, cfg, opt_cfg, epochs, build_regularizer(model, cfg.regularizer))
    n = data.x_train.shape[0]
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        for chunk in perm.chunk(evals):
            res = train_epoch(model, update, data.x_train[chunk], data.y_train[chunk], cfg.trainer.batch_size, g)
            clock[0] += res.seconds
            acc = evaluate(model, data.x_val, data.y_val)["acc"]
            trace.append({"run": label, "train_s": clock[0], "val_acc": acc, "epoch": epoch + 1})
            yield
        update.end_epoch()
    return model


def new_model(cfg, data):
    set_seed(int(cfg.seed))
    return build_model(model_spec(cfg.model, data)).to(device=data.x_train.device, dtype=data.x_train.dtype)


def single_run(cfg, data, epochs, evals, trace, clock):
    g = torch.Generator().manual_seed(int(cfg.seed))
    yield from run_level(new_model(cfg, data), cfg, cfg.optimizer, data, epochs, evals, g, trace, clock, "single")


def pyramid_run(cfg, levels, data, evals, trace, clock):
    """The pyramid schedule as one generator: each level in turn, prolonged in between."""
    g = torch.Generator().manual_seed(int(cfg.seed))
    op, sigma = cfg.pyramid.operator, float(cfg.pyramid.sigma)
    model = transfer_resolution(new_model(cfg, data), -levels[0].down, op)
    for i, lv in enumerate(levels):
        if i:
            t0 = time.perf_counter()
            model = transfer_resolution(model, levels[i - 1].down - lv.down, op)
            clock[0] += time.perf_counter() - t0
            d = level_data(data, lv.down, op, sigma)
            acc = evaluate(model, d.x_val, d.y_val)["acc"]
            trace.append({"run": f"{lv.name} (prolonged)", "down": lv.down, "train_s": clock[0], "val_acc": acc,
                          "epoch": 0})
        opt_cfg = cfg.optimizer if lv.lr is None else OmegaConf.merge(cfg.optimizer, {"lr": lv.lr})
        start = len(trace)
        model = yield from run_level(model, cfg, opt_cfg, level_data(data, lv.down, op, sigma), lv.epochs, evals, g,
                                     trace, clock, lv.name)
        for r in trace[start:]:
            r["down"] = lv.down


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pyramid", default="2level", help="the pyramid config (conf/pyramid/NAME.yaml)")
    ap.add_argument("--epochs", type=int, default=None, help="single-level epochs (default: the pyramid's total)")
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--evals-per-epoch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="outputs/bench/pyramid")
    ap.add_argument("overrides", nargs="*", help="msnet train overrides for both runs (default: optimizer=adam, "
                    "lr 2e-3, cosine schedule, batch 128), e.g. experiment=bcd_fashion or pyramid.epochs=[4,2]")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    shared = [f"dataset.train_subset={args.train_subset or 'null'}", "dataset.test_subset=0",
              f"model.channels={args.channels}", f"model.layers={args.layers}", "trainer.progress=false"]
    cfg = compose_config([*shared, f"+pyramid={args.pyramid}", *args.overrides])
    data = prepare_data(cfg.dataset, resolve_device(cfg.device), resolve_dtype(cfg.dtype))
    levels = build_schedule(cfg, data.image_size, len(model_spec(cfg.model, data).stages))
    epochs = args.epochs or sum(lv.epochs for lv in levels)
    console = RunConsole()

    # The two runs advance in turns, one chunk each, so that machine noise hits both alike.
    single_trace, single_clock = [], [0.0]
    pyr_trace, pyr_clock = [], [0.0]
    single = single_run(cfg, data, epochs, args.evals_per_epoch, single_trace, single_clock)
    pyramid = pyramid_run(cfg, levels, data, args.evals_per_epoch, pyr_trace, pyr_clock)
    h, w = data.image_size
    plan = " -> ".join(f"{lv.epochs} ep at {h >> lv.down}x{w >> lv.down}" + (f" lr {lv.lr}" if lv.lr else "")
                       for lv in levels)
    setting = (f"fashion_mnist, {data.x_train.shape[0]} training images, {args.channels} channels x {args.layers} "
               f"layers, optimizer {cfg.optimizer.name} (lr {cfg.optimizer.lr}, {cfg.optimizer.scheduler}), batch "
               f"{cfg.trainer.batch_size}, overrides {args.overrides}, {torch.get_num_threads()} threads")
    console.print(f"{setting}\nsingle-level: {epochs} epochs at {h}x{w}; pyramid {args.pyramid}: {plan}; "
                  "interleaved chunk by chunk ...")
    active = [single, pyramid]
    while active:
        for run in list(active):
            try:
                next(run)
            except StopIteration:
                active.remove(run)
    target = single_trace[-1]["val_acc"] - 0.005

    def time_to(trace):
        """The first evaluation at full resolution (coarse levels' are on coarse images) at or above the target."""
        hit = next((r for r in trace if r.get("down", 0) == 0 and r["val_acc"] >= target), None)
        return (hit["train_s"], hit["run"], hit["epoch"]) if hit else (None, None, None)

    ts, _, _ = time_to(single_trace)
    tp, where, ep = time_to(pyr_trace)
    rows = [
        {"run": f"single-level {h}x{w}", "epochs": epochs, "final_val_acc": f"{single_trace[-1]['val_acc']:.2%}",
         "train_s": round(single_trace[-1]["train_s"], 1), "time_to_target_s": round(ts, 1) if ts else None},
        {"run": f"pyramid {args.pyramid}", "epochs": "+".join(str(lv.epochs) for lv in levels),
         "final_val_acc": f"{pyr_trace[-1]['val_acc']:.2%}", "train_s": round(pyr_trace[-1]["train_s"], 1),
         "time_to_target_s": round(tp, 1) if tp else None},
    ]
    lines = []
    for lv in levels:
        recs = [r for r in pyr_trace if r["run"] == lv.name]
        pro = [r for r in pyr_trace if r["run"] == f"{lv.name} (prolonged)"]
        lines.append(f"pyramid level {lv.name} ({h >> lv.down}x{w >> lv.down}): "
                     + (f"{pro[0]['val_acc']:.2%} right after prolongation, " if pro else "")
                     + (f"{recs[-1]['val_acc']:.2%} at its end, after {recs[-1]['train_s']:.1f} s" if recs else "no epochs"))
    if tp is None:
        lines.append("pyramid did not reach the target within its budget: ratio undefined (> 1)")
        ratio = None
    else:
        ratio = tp / ts
        lines.append(f"pyramid reached it in level '{where}', epoch {ep}")
        lines.append(f"ratio pyramid / single = {ratio:.3f}  (goal <= 0.6)")
    title = f"time to {target:.2%} validation accuracy (single-level final - 0.5 points)"
    columns = ["run", "epochs", "final_val_acc", "train_s", "time_to_target_s"]
    console.print(records_table(title, rows, columns))
    for line in lines:
        console.print(line)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = [setting, "", title, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    md += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    (out / "bench_pyramid.md").write_text("\n".join(md + [""] + lines) + "\n")
    (out / "bench_pyramid.json").write_text(json.dumps(
        {"setting": setting, "overrides": args.overrides, "pyramid": args.pyramid,
         "levels": [lv.to_dict() for lv in levels], "single_epochs": epochs, "target": target, "ratio": ratio,
         "rows": rows, "curves": {"single": single_trace, "pyramid": pyr_trace}}, indent=1) + "\n")
    console.print(f"written: {out / 'bench_pyramid.md'}, {out / 'bench_pyramid.json'}")


if __name__ == "__main__":
    try:
        main()
    except (MsnetError, HydraException) as err:  # a bad override or config: one line, no traceback
        raise SystemExit(f"bench_pyramid: error: {str(err).splitlines()[0]}")

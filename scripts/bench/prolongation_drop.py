#!/usr/bin/env python
"""Validation accuracy lost when a network trained on coarse images is prolonged to the fine grid.

For each image transfer and smoothing (``OP:SIGMA``, e.g. ``constant:0``): train msnet's network
at one restriction below the native resolution (images restricted as ``+pyramid`` makes them:
Gaussian of std SIGMA fine pixels, then R of the pair OP) for ``--epochs`` epochs, prolong its
stencils and classifier with the same pair (``msnet.multigrid.transfer_resolution``), and
evaluate the prolonged network on the raw fine validation images and on P R x (the fine images
with their detail below the coarse grid removed), and the network whose stencils are then
refitted on ``--fit-images`` training images (``pyramid.stencils=fit``, msnet.multigrid.datafit)
on the raw fine images. This is the drop the pyramid's fine level has
to recover (docs/results.md, "Benchmark: the pyramid against single-level training").

    .venv/bin/python scripts/bench/prolongation_drop.py linear:1 constant:1 constant:0 linear:0
"""

from __future__ import annotations

import argparse

import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf

from _harness import markdown_table, start, train_config, write_md_json
from msnet.errors import MsnetError
from msnet.core import resolve_device, resolve_dtype
from msnet.data import prepare_data
from msnet.multigrid import get_transfer, transfer_resolution
from msnet.runs import RunConsole
from msnet.runs.display import records_table
from msnet.training.fit import run_levels
from msnet.training.evaluation import evaluate
from msnet.training.schedule import Level, Schedule


def parse_setting(text: str):
    op, _, sigma = text.partition(":")
    try:
        get_transfer(op)
        return op, float(sigma or 1.0)
    except ValueError:
        raise MsnetError(f"setting {text!r}: use OP:SIGMA, e.g. constant:0 or linear:1") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="+", help="OP:SIGMA pairs, e.g. linear:1 constant:0")
    ap.add_argument("--epochs", type=int, default=5, help="coarse training epochs")
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--train-subset", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit-images", type=int, default=256, help="training images of the data-fitted stencils")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="outputs/bench/prolongation_drop")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [parse_setting(s) for s in args.settings]
    cfg = train_config([f"dataset.train_subset={args.train_subset}", "dataset.test_subset=0",
                        f"model.channels={args.channels}", f"model.layers={args.layers}", f"seed={args.seed}",
                        f"trainer.epochs={args.epochs}", "trainer.progress=false", "trainer.eval_batch_size=1000"])
    data = prepare_data(cfg.dataset, resolve_device(cfg.device), resolve_dtype(cfg.dtype))
    console = RunConsole()
    rows = []
    for op, sigma in settings:
        # the pyramid's first two levels as msnet train runs them: the coarse one trained, then the move onto the
        # fine grid with fitted stencils (its fine level gets no epochs here)
        fit = OmegaConf.create({"operator": op, "stencils": "fit", "fit_images": args.fit_images, "fit_ridge": 1e-3})
        schedule = Schedule([Level("coarse", 1, args.epochs), Level("fine", 0, 0)], op, sigma, pyramid=fit,
                            seed=args.seed)
        state, _ = start(cfg, data, schedule)
        for step in run_levels(state, schedule, data, cfg, summaries=False):
            if step.kind == "epoch" and state.finished(schedule):  # the coarse level's last epoch
                coarse = state.model
        fitted, d = state.model, schedule.data_at(data, 1)
        fine = transfer_resolution(coarse, 1, op)
        pair = get_transfer(op)
        with torch.no_grad():
            smooth_val = pair.prolong(pair.restrict(data.x_val))
        rows.append({"operator": op, "sigma": sigma,
                     "coarse val": evaluate(coarse, d.x_val, d.y_val)["acc"],
                     "prolonged, raw fine": evaluate(fine, data.x_val, data.y_val)["acc"],
                     "prolonged, P R x": evaluate(fine, smooth_val, data.y_val)["acc"],
                     "prolonged, stencils fit": evaluate(fitted, data.x_val, data.y_val)["acc"]})
        console.print(f"{op}:{sigma} done")
    shown = [{k: (f"{v:.2%}" if isinstance(v, float) and k != "sigma" else v) for k, v in r.items()} for r in rows]
    setting = (f"{data.name}, {data.x_train.shape[0]} training images, {args.channels} channels x {args.layers} "
               f"layers, {args.epochs} coarse epochs of {cfg.optimizer.name} (lr {cfg.optimizer.lr}), seed {args.seed}")
    title = "validation accuracy at the coarse level and right after prolongation to the fine grid"
    console.print(setting)
    console.print(records_table(title, shown, list(shown[0])))
    written = write_md_json(args.out, "prolongation_drop", [setting, "", title, "", *markdown_table(shown)],
                            {"setting": setting, "rows": rows})
    console.print(f"written: {written[0]}")


if __name__ == "__main__":
    try:
        main()
    except (MsnetError, HydraException) as err:
        raise SystemExit(f"prolongation_drop: error: {str(err).splitlines()[0]}")

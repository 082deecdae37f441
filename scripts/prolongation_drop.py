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
to recover (README, Benchmarks: bench_pyramid.py).

    .venv/bin/python scripts/prolongation_drop.py linear:1 constant:1 constant:0 linear:0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hydra.errors import HydraException

from msnet import MsnetError
from msnet.config import compose_config
from msnet.core import build_model, resolve_device, resolve_dtype
from msnet.data import prepare_data
from msnet.multigrid import get_transfer, transfer_resolution
from msnet.runs import RunConsole
from msnet.runs.display import records_table
from msnet.train.loop import evaluate, train_epoch
from msnet.train.regularizers import build_regularizer
from msnet.multigrid import level_data
from msnet.train.schedule import prolong_level
from msnet.train.setup import model_spec, set_seed
from msnet.train.updates import build_update


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
    cfg = compose_config([f"dataset.train_subset={args.train_subset}", "dataset.test_subset=0",
                          f"model.channels={args.channels}", f"model.layers={args.layers}", f"seed={args.seed}"])
    data = prepare_data(cfg.dataset, resolve_device(cfg.device), resolve_dtype(cfg.dtype))
    console = RunConsole()
    rows = []
    for op, sigma in settings:
        set_seed(args.seed)
        coarse = transfer_resolution(build_model(model_spec(cfg.model, data)).to(data.x_train), -1, op)
        d = level_data(data, 1, op, sigma)
        update = build_update(coarse, cfg, cfg.optimizer, args.epochs, build_regularizer(coarse, cfg.regularizer))
        g = torch.Generator().manual_seed(args.seed)
        for _ in range(args.epochs):
            train_epoch(coarse, update, d.x_train, d.y_train, cfg.trainer.batch_size, g)
            update.end_epoch()
        fine = transfer_resolution(coarse, 1, op)
        fitted, _ = prolong_level(coarse, d, data, 1, {"operator": op, "stencils": "fit",
                                                       "fit_images": args.fit_images, "fit_ridge": 1e-3}, args.seed)
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = list(shown[0])
    md = [setting, "", title, "", "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in shown]
    (out / "prolongation_drop.md").write_text("\n".join(md) + "\n")
    (out / "prolongation_drop.json").write_text(json.dumps({"setting": setting, "rows": rows}, indent=1) + "\n")
    console.print(f"written: {out / 'prolongation_drop.md'}")


if __name__ == "__main__":
    try:
        main()
    except (MsnetError, HydraException) as err:
        raise SystemExit(f"prolongation_drop: error: {str(err).splitlines()[0]}")

#!/usr/bin/env python
"""BCD (optimizer=bcd) against Adam and SGD on the same network, data and objective, in one run.

Every method starts from the same initial weights (same seed), sees the same training and
validation images, and minimises the same objective (cross-entropy + the ``regularizer.*``
given with ``--reg``). Each is configured from msnet's own config groups, exactly as
``msnet train optimizer=NAME`` would be (learning-rate schedules are constant here, so
that stopping early is fair to all):

* adam: ``optimizer=adam optimizer.scheduler=constant`` (lr 2e-3), batch 128;
* sgd:  ``optimizer=sgd`` (lr 0.1, momentum 0.9), batch 128;
* bcd:  ``optimizer=bcd`` (Gauss–Newton–CG + Newton–CG, see msnet/methods/bcd.py), batch 1024.

Each is trained by the trainer's own level loop (``msnet.training.fit.run_levels``, through
``scripts/bench/_harness.py``). The runs advance in turns, ``1/--evals-per-epoch`` of an epoch each, so
that noise from other work on the machine hits all alike; validation accuracy is measured before
training and after every chunk, and evaluation time is excluded from the clocks. The target accuracy is ``--target``, by default
Adam's final validation accuracy minus one point. Printed and written into ``--out``:
a table (``bench_optimizers.md``) of each method's final and best accuracy, training time,
and time and epochs to the target as ratios to Adam's; the curves (``bench_optimizers.json``);
and a plot of validation accuracy against training time and against epochs
(``bench_optimizers.png``, needs matplotlib).

    .venv/bin/python scripts/bench/bench_optimizers.py            # ~15 min on 2 CPU cores
    .venv/bin/python scripts/bench/bench_optimizers.py --quick    # ~2 min: a smoke test of the script
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import torch

from _harness import Point, first_hit, interleave, markdown_table, plot_curves, run, train_config, write_md_json
from msnet.core import resolve_device, resolve_dtype
from msnet.data import prepare_data
from msnet.runs import RunConsole

METHODS = {
    "adam": ["optimizer=adam", "optimizer.scheduler=constant", "trainer.batch_size=128"],
    "sgd": ["optimizer=sgd", "trainer.batch_size=128"],
    "bcd": ["optimizer=bcd", "trainer.batch_size=1024"],
}


def traced(name: str, points: Iterator[Point], trace: List[Dict[str, Any]]) -> Iterator[None]:
    """Append each evaluation of method ``name`` to ``trace`` (the first before any training), yielding after each."""
    for p in points:
        trace.append({"method": name, "epoch": p["epoch"], "iterations": p["batches"], "train_s": p["train_s"],
                      "val_acc": p["val_acc"], "val_loss": p["val_loss"]})
        yield


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3,000 images, 2 epochs: checks the script in ~2 min")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per method (default 4; quick 2)")
    ap.add_argument("--train-subset", type=int, default=None, help="training images (default 20000; quick 3000)")
    ap.add_argument("--val-size", type=int, default=None, help="validation images (default 2000; quick 1000)")
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--evals-per-epoch", type=int, default=None, help="default 4; quick 2")
    ap.add_argument("--methods", default="adam,sgd,bcd", help=f"comma-separated, from {','.join(METHODS)}")
    ap.add_argument("--target", type=float, default=None, help="validation accuracy in [0, 1] (default: adam's "
                    "final minus 0.01)")
    ap.add_argument("--reg", nargs="*", default=["regularizer.classifier_smoothness=1e-7"],
                    help="overrides shared by every method (default: the paper's ||grad W||^2 at weight 1e-7)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="outputs/bench/optimizers")
    args = ap.parse_args()
    epochs = args.epochs or (2 if args.quick else 4)
    subset = args.train_subset or (3000 if args.quick else 20000)
    val_size = args.val_size or (1000 if args.quick else 2000)
    evals = args.evals_per_epoch or (2 if args.quick else 4)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; choose from {','.join(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    shared = [f"dataset.train_subset={subset}", f"dataset.val_size={val_size}", "dataset.test_subset=0",
              f"model.channels={args.channels}", f"model.layers={args.layers}", f"trainer.epochs={epochs}",
              "trainer.progress=false", "trainer.eval_at_start=true", "trainer.eval_batch_size=1000", *args.reg]
    cfgs = {m: train_config(shared + METHODS[m]) for m in methods}
    first = cfgs[methods[0]]
    data = prepare_data(first.dataset, resolve_device(first.device), resolve_dtype(first.dtype))
    console = RunConsole()
    console.print(f"fashion_mnist: {data.x_train.shape[0]} training / {data.x_val.shape[0]} validation images, "
                  f"{args.channels} channels x {args.layers} layers, {epochs} epochs per method, "
                  f"{torch.get_num_threads()} threads, shared overrides {args.reg}; the runs advance in turns ...")

    traces: Dict[str, List[Dict[str, Any]]] = {m: [] for m in methods}
    t0 = time.perf_counter()
    interleave(*(traced(m, run(cfgs[m], data, evals)[1], traces[m]) for m in methods))
    wall = time.perf_counter() - t0

    base = "adam" if "adam" in traces else methods[0]
    target = args.target if args.target is not None else traces[base][-1]["val_acc"] - 0.01
    base_hit = first_hit(traces[base], target)
    rows = []
    for m in methods:
        tr, hit = traces[m], first_hit(traces[m], target)
        row = {
            "method": m, "batch": cfgs[m].trainer.batch_size, "iterations": tr[-1]["iterations"],
            "train_s": round(tr[-1]["train_s"], 1), "s_per_epoch": round(tr[-1]["train_s"] / epochs, 1),
            "final_val_acc": f"{tr[-1]['val_acc']:.2%}", "best_val_acc": f"{max(r['val_acc'] for r in tr):.2%}",
            "time_to_target_s": round(hit["train_s"], 1) if hit else "not reached",
            "epochs_to_target": round(hit["epoch"], 2) if hit else "not reached",
        }
        if hit and base_hit and base_hit["train_s"] > 0:
            row[f"time_ratio_vs_{base}"] = round(hit["train_s"] / base_hit["train_s"], 2)
            row[f"epoch_ratio_vs_{base}"] = round(hit["epoch"] / base_hit["epoch"], 2)
        else:
            row[f"time_ratio_vs_{base}"] = row[f"epoch_ratio_vs_{base}"] = "-"
        rows.append(row)
    columns = list(rows[0])
    title = (f"time to {target:.2%} validation accuracy" + (f" ({base}'s final - 1 point)" if args.target is None
                                                             else ""))
    md = [title, "", *markdown_table(rows, columns)]
    print("\n".join(md) + "\n", flush=True)  # plain markdown: a rich table would be cut to the terminal's width
    console.print(f"total wall time {wall:.0f} s (evaluation included)")

    written = write_md_json(args.out, "bench_optimizers", md, {
        "target": target, "epochs": epochs, "train_images": int(data.x_train.shape[0]),
        "val_images": int(data.x_val.shape[0]), "channels": args.channels, "layers": args.layers,
        "shared_overrides": shared, "methods": {m: METHODS[m] for m in methods}, "rows": rows, "curves": traces})
    png = Path(args.out) / "bench_optimizers.png"
    title = (f"Fashion-MNIST, {data.x_train.shape[0]} images, {args.channels} ch x {args.layers} layers; "
             f"dashed: target {target:.2%}")
    if plot_curves(traces, target, png, title, [("train_s", "training wall time (s)"), ("epoch", "epochs")]):
        written.append(png)
    else:
        console.print("matplotlib missing (pip install 'msnet[plot]'): no plot")
    console.print("written: " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()

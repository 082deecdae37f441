#!/usr/bin/env python
"""Training throughput (images/second) of msnet's trainer against a minimal hand-written loop, on a GPU.

For each depth (layers of the default one-stage ODE-ResNet, 16 channels, Fashion-MNIST
28x28 or synthetic 28x28 images resident on the device), eager and ``torch.compile``-d,
fp32 and bf16 autocast: one epoch of ``msnet.training.loop.train_epoch`` with the
``FirstOrder`` rule that ``msnet train`` builds (``msnet.training.speed.prepare_update``: NHWC
layout on CUDA, autocast, compile), and one epoch of the loop a person would write with
the same options (permute, slice, forward under autocast, loss, backward, Adam step).
The two alternate (ABAB...) so that machine noise hits both; the table gives the median
images/second of each and the ratio msnet / hand-written (1.00 = no overhead). Compilation
happens in a warm-up epoch and is reported separately (seconds).

    .venv/bin/python scripts/bench/bench_gpu.py                  # GPU: depths 4 and 32, eager/compiled, fp32/bf16
    .venv/bin/python scripts/bench/bench_gpu.py --quick          # any device: depth 4, fp32, eager, 1,024 images
    .venv/bin/python scripts/bench/bench_gpu.py --json rows.json # also write the rows (after each one)

Eager rows come first, so that a run cut short (scripts/gpu_check.sh gives it a timeout)
keeps them; compiled rows pay a compilation each.

Without a GPU only the --quick row runs (on the CPU), and the script says so: the GPU table
needs a CUDA device.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from msnet.config import DatasetConfig, TrainerConfig
from msnet.core import ModelSpec, StageSpec, build_model
from msnet.data import prepare_data
from msnet.runs import RunConsole
from msnet.runs.display import records_table
from msnet.training import speed
from msnet.training.distributed import DistEnv
from msnet.training.loop import train_epoch
from msnet.methods.first_order import FirstOrder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_written(model, device, precision, compiled):
    """A hand-written training epoch with the same layout/precision/compile choices as msnet's: returns epoch(x, y, B, g)."""
    channels_last = device.type == "cuda"
    if channels_last:
        speed.to_channels_last(model)
    net = torch.compile(model) if compiled else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    dtype = speed.PRECISIONS[precision]

    def epoch(x, y, batch_size, g):
        model.train()
        sync(device)
        t = time.perf_counter()
        perm = torch.randperm(x.shape[0], generator=g).to(x.device)
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            xb = x[idx].contiguous(memory_format=torch.channels_last) if channels_last else x[idx]
            if dtype is None:
                logits = net(xb)
            else:
                with torch.autocast(device.type, dtype=dtype):
                    logits = net(xb)
            loss = F.cross_entropy(logits.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        return time.perf_counter() - t

    return epoch


def msnet_loop(model, device, precision, compiled):
    """msnet's epoch: train_epoch + the FirstOrder rule prepared as `msnet train` prepares it."""
    cfg = OmegaConf.create({"trainer": OmegaConf.structured(TrainerConfig(precision=precision, compile=compiled))})
    rule = speed.prepare_update(FirstOrder(model, torch.optim.Adam(model.parameters(), lr=1e-3)), model, cfg,
                                DistEnv(), device)

    def epoch(x, y, batch_size, g):
        sync(device)
        t = time.perf_counter()
        train_epoch(model, rule, x, y, batch_size, g)
        sync(device)
        return time.perf_counter() - t

    return epoch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20000, help="training images per epoch")
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs of each loop (alternating)")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--depths", default="4,32", help="layers per run, comma-separated")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--quick", action="store_true", help="depth 4, fp32, eager, 1,024 images, 2 repeats")
    ap.add_argument("--dataset", default="auto", choices=["auto", "fashion_mnist", "synthetic"],
                    help="auto: Fashion-MNIST if on disk, else synthetic 28x28")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here (after each row)")
    args = ap.parse_args()

    console = RunConsole()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type != "cuda" and not args.quick:
        console.print("[yellow]no CUDA device: running only --quick on the CPU; the GPU table needs a GPU[/yellow]")
        args.quick = True
    depths = [4] if args.quick else [int(d) for d in args.depths.split(",")]
    variants = [(False, "fp32")] if args.quick else list(itertools.product([False, True], ["fp32", "bf16"]))
    images, repeats = (min(args.images, 1024), min(args.repeats, 2)) if args.quick else (args.images, args.repeats)

    try:
        if args.dataset == "synthetic":
            raise LookupError("synthetic data asked for")
        dcfg = OmegaConf.structured(DatasetConfig(name="fashion_mnist", download=False, train_subset=images))
        data = prepare_data(dcfg, device)
        source = "Fashion-MNIST 28x28"
    except Exception:
        if args.dataset == "fashion_mnist":
            raise
        dcfg = OmegaConf.structured(DatasetConfig(name="synthetic", n_train=images + 500, val_size=500,
                                                  image_size=28, num_classes=10))
        data = prepare_data(dcfg, device)
        source = "synthetic 28x28"
    x, y = data.x_train, data.y_train

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    rows = []
    # eager rows first (variants are (compiled, precision) with False < True)
    for (compiled, precision), depth in itertools.product(variants, depths):
        spec = ModelSpec(data.in_channels, data.num_classes, data.image_size, [StageSpec(args.channels, depth, 1.0)])
        loops = {}
        for name, make in (("hand", hand_written), ("msnet", msnet_loop)):
            torch.manual_seed(0)
            loops[name] = make(build_model(spec).to(device), device, precision, compiled)
        g = {name: torch.Generator().manual_seed(0) for name in loops}
        n_warm = min(1024, x.shape[0] // 4)  # compiles, and warms allocator and kernels
        warm = {name: loop(x[:n_warm], y[:n_warm], args.batch_size, g[name]) for name, loop in loops.items()}
        times = {name: [] for name in loops}
        for _ in range(repeats):
            for name, loop in loops.items():
                times[name].append(loop(x, y, args.batch_size, g[name]))
        ips = {name: x.shape[0] / statistics.median(t) for name, t in times.items()}
        row = {"layers": depth, "mode": "compiled" if compiled else "eager", "precision": precision,
               "hand img/s": round(ips["hand"]), "msnet img/s": round(ips["msnet"]),
               "msnet / hand": f"{ips['msnet'] / ips['hand']:.3f}",
               "warm-up s (hand, msnet)": f"{warm['hand']:.1f}, {warm['msnet']:.1f}"}
        rows.append(row)
        console.print("  ".join(f"{k} {v}" for k, v in row.items()))
        if args.json:
            args.json.write_text(json.dumps({
                "script": "bench_gpu", "date": str(datetime.date.today()), "device": machine, "torch": torch.__version__,
                "setting": {"data": source, "images": int(x.shape[0]), "batch_size": args.batch_size,
                            "channels": args.channels, "repeats": repeats}, "rows": rows}, indent=1))

    console.print(records_table(
        f"images/second, {source}, {x.shape[0]} images, batch {args.batch_size}, {args.channels} channels, "
        f"median of {repeats}", rows, list(rows[0])))
    console.print(f"{datetime.date.today()}  {machine}  torch {torch.__version__}"
                  + ("" if device.type == "cuda" else "  (the GPU table needs a CUDA device)"))


if __name__ == "__main__":
    main()

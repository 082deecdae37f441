#!/usr/bin/env python
"""Epoch time of msnet's training loop against a minimal hand-written PyTorch loop.

Same network (the default paper-style ODE-ResNet), same in-memory data, same batch
size, same optimiser, in one process. The two loops alternate (ABAB...) so that
machine noise hits both; the script prints the median epoch time of each and the
ratio msnet / hand-written (goal: <= 1.05).

    .venv/bin/python scripts/bench/bench_overhead.py [--images 10000] [--repeats 3] [--channels 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from msnet.config import DatasetConfig
from msnet.core import ModelSpec, StageSpec, build_model
from msnet.data import prepare_data
from msnet.runs import RunConsole
from msnet.training.loop import train_epoch


def hand_written_epoch(model, opt, x, y, batch_size, g):
    """The loop a person would write: permute, slice, forward, loss, backward, step."""
    model.train()
    t = time.perf_counter()
    perm = torch.randperm(x.shape[0], generator=g)
    for i in range(0, x.shape[0], batch_size):
        idx = perm[i : i + batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10000, help="training images per epoch")
    ap.add_argument("--repeats", type=int, default=3, help="epochs of each loop (alternating)")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()

    try:
        cfg = OmegaConf.structured(DatasetConfig(name="fashion_mnist", download=False, train_subset=args.images))
        data = prepare_data(cfg, torch.device("cpu"))
        source = "fashion_mnist"
    except Exception:
        cfg = OmegaConf.structured(DatasetConfig(name="synthetic", n_train=args.images + 500, val_size=500,
                                                 image_size=28, num_classes=10))
        data = prepare_data(cfg, torch.device("cpu"))
        source = "synthetic 28x28"
    spec = ModelSpec(data.in_channels, data.num_classes, data.image_size, [StageSpec(args.channels, args.layers, 1.0)])

    def fresh():
        torch.manual_seed(0)
        model = build_model(spec)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    console = RunConsole()
    msnet_times, hand_times = [], []
    m_model, m_opt = fresh()
    h_model, h_opt = fresh()
    g_m, g_h = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    # one warm-up epoch each (allocator, thread pools)
    hand_written_epoch(h_model, h_opt, data.x_train[:1024], data.y_train[:1024], args.batch_size, g_h)
    train_epoch(m_model, m_opt, data.x_train[:1024], data.y_train[:1024], args.batch_size, g_m)
    for r in range(args.repeats):
        hand_times.append(hand_written_epoch(h_model, h_opt, data.x_train, data.y_train, args.batch_size, g_h))
        with console.progress(True) as progress:
            task = progress.add_task("msnet epoch", total=-(-data.x_train.shape[0] // args.batch_size), loss="-", acc="-", ips="-")

            def cb(done, loss, acc, ips):
                progress.update(task, completed=done, loss=f"{loss:.3f}", acc=f"{acc:.2%}", ips=f"{ips:.0f}")
                progress.refresh()

            res = train_epoch(m_model, m_opt, data.x_train, data.y_train, args.batch_size, g_m, on_progress=cb)
        msnet_times.append(res.seconds)
        console.print(f"repeat {r + 1}: hand-written {hand_times[-1]:.2f}s  msnet {msnet_times[-1]:.2f}s")
    h, m = statistics.median(hand_times), statistics.median(msnet_times)
    console.print(
        f"data {source}, {data.x_train.shape[0]} images, {args.channels} channels x {args.layers} layers, "
        f"batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    console.print(f"hand-written loop : {h:.2f} s/epoch (median of {args.repeats})")
    console.print(f"msnet train_epoch : {m:.2f} s/epoch (median of {args.repeats})")
    console.print(f"ratio msnet / hand-written = {m / h:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()

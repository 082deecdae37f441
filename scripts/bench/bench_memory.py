#!/usr/bin/env python
"""Activation memory and step time of backprop=store against backprop=reversible, by depth.

One stage of N steps (the depth) of each reversible integrator on its residual
(Chang et al. 2018, arXiv:1709.03698), same weights for both modes, one training
step (forward, loss, backward) on a fixed batch. For each depth and mode it reports

- saved bytes: everything autograd keeps for backward, counted exactly with
  ``torch.autograd.graph.saved_tensors_hooks`` (distinct storages; parameters, which
  exist anyway, are left out);
- peak CUDA memory above the model and batch (``torch.cuda.max_memory_allocated``), on a GPU;
- step time: median of ``--repeats`` steps, the two modes alternating (ABAB...) so
  that machine noise hits both. On the CPU the ratio is taken from the process's CPU
  time (``time.process_time``, one thread by default): on a machine shared with other
  jobs wall time mostly measures the neighbours, CPU time what the step costs. Wall
  times are printed too. On a GPU: wall time after ``torch.cuda.synchronize``.

Goals: reversible saved bytes at depth 64 within 1.2x of depth 4; reversible step
time <= 1.6x store.

    .venv/bin/python scripts/bench/bench_memory.py [--depths 4 16 64 256] [--channels 32] [--size 28] [--batch 64] [--json F]

The defaults are a Fashion-MNIST-sized layer (the first unit of conf/model/hamiltonian.yaml).
Reversible backward calls ``torch.autograd.grad`` once per sub-step from inside a
backward (a re-entrant call, ~0.1-1 ms each on the CPU), so on very small layers
(``--channels 16 --size 16 --batch 32``) that fixed cost shows in the time ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

import msnet.conf
from msnet.config import compose_config
from msnet.core import INTEGRATORS, RESIDUALS, ModelSpec, StageSpec, build_model, resolve_device

PRESETS = Path(msnet.conf.__file__).parent / "model"


def residual_for(name: str) -> str:
    """The field of the model preset that steps with integrator ``name`` (``conf/model/NAME.yaml``: hamiltonian,
    midpoint's stable conv_antisym, leapfrog's conv_sym), composed as ``msnet train model=NAME`` composes it;
    else conv_act, or a residual with the parts the scheme needs."""
    if (PRESETS / f"{name}.yaml").exists():
        model = compose_config([f"model={name}"]).model
        if model.integrator == name:
            return str(model.residual)
    needs = set(getattr(INTEGRATORS.get(name), "parts", ()))
    if not needs:
        return "conv_act"
    return next(r for r in RESIDUALS.names() if needs <= set(getattr(RESIDUALS.get(r), "parts", ())))


def saved_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one training step: distinct storages, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return sum(storages.values())


def step_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, float]:
    """(wall, process CPU) seconds of forward + loss + backward."""
    model.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    F.cross_entropy(model(x), y).backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c


def peak_cuda_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Peak CUDA memory of one step above what the model, its gradients and the batch hold."""
    model.zero_grad(set_to_none=False)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    F.cross_entropy(model(x), y).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def build(name: str, depth: int, backprop: str, args, device, dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    spec = ModelSpec(1, 10, (args.size, args.size), [StageSpec(args.channels, depth, 1.0)],
                     residual=residual_for(name), integrator=name, activation="tanh", backprop=backprop)
    return build_model(spec).to(device=device, dtype=dtype)


def mib(n: float) -> str:
    return f"{n / 2**20:9.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    reversible = [n for n in INTEGRATORS.names() if INTEGRATORS.get(n).reversible]
    ap.add_argument("--integrators", nargs="+", default=reversible)
    ap.add_argument("--depths", nargs="+", type=int, default=[4, 16, 64])
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--size", type=int, default=28, help="image side, pixels")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per mode (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU time is the step's own work)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here (after each row)")
    args = ap.parse_args()

    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, args.size, args.size, generator=g).to(device=device, dtype=dtype)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}, {args.dtype}, "
          f"{torch.get_num_threads()} threads; one stage, {args.channels} channels, {args.size}x{args.size} images, "
          f"batch {args.batch}; step = forward + loss + backward, median of {args.repeats}")
    clock = "wall" if cuda else "CPU"
    head = f"{'integrator':<12} {'depth':>5} | {'saved MiB store':>15} {'reversible':>10} | " + (
        f"{'peak MiB store':>14} {'reversible':>10} | " if cuda else "") + (
        f"{clock + ' s store':>12} {'reversible':>10} {'ratio':>6}"
        + ("" if cuda else f" | {'wall s store':>12} {'reversible':>10}"))
    print(head)
    print("-" * len(head))
    summary: List[Tuple[str, float, float]] = []
    records: List[Dict] = []

    def write_json() -> None:
        if args.json:
            args.json.write_text(json.dumps({
                "script": "bench_memory", "date": str(datetime.date.today()),
                "device": torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads",
                "torch": torch.__version__, "clock": clock,
                "setting": {k: v for k, v in vars(args).items() if k != "json"}, "rows": records,
                "goals": [{"integrator": n, "memory_growth": m, "worst_time_ratio": t} for n, m, t in summary]},
                indent=1))

    for name in args.integrators:
        rows = {}
        for depth in args.depths:
            models = {bp: build(name, depth, bp, args, device, dtype) for bp in ("store", "reversible")}
            mem = {bp: saved_bytes(m, x, y) for bp, m in models.items()}
            peak = {bp: peak_cuda_bytes(m, x, y) for bp, m in models.items()} if cuda else {}
            times: Dict[str, List[Tuple[float, float]]] = {"store": [], "reversible": []}
            for bp, m in models.items():
                step_seconds(m, x, y)  # warm-up
            for _ in range(args.repeats):
                for bp, m in models.items():
                    times[bp].append(step_seconds(m, x, y))
            wall = {bp: statistics.median(w for w, _ in v) for bp, v in times.items()}
            t = wall if cuda else {bp: statistics.median(c for _, c in v) for bp, v in times.items()}
            rows[depth] = (mem, t)
            print(f"{name:<12} {depth:>5} | {mib(mem['store']):>15} {mib(mem['reversible']):>10} | "
                  + (f"{mib(peak['store']):>14} {mib(peak['reversible']):>10} | " if cuda else "")
                  + f"{t['store']:>12.4f} {t['reversible']:>10.4f} {t['reversible'] / t['store']:>6.2f}"
                  + ("" if cuda else f" | {wall['store']:>12.4f} {wall['reversible']:>10.4f}"), flush=True)
            records.append({
                "integrator": name, "depth": depth,
                "saved MiB store": round(mem["store"] / 2**20, 2), "saved MiB reversible": round(mem["reversible"] / 2**20, 2),
                **({"peak MiB store": round(peak["store"] / 2**20, 2),
                    "peak MiB reversible": round(peak["reversible"] / 2**20, 2)} if cuda else {}),
                f"{clock} s store": round(t["store"], 5), f"{clock} s reversible": round(t["reversible"], 5),
                "time ratio": round(t["reversible"] / t["store"], 3)})
            write_json()
        lo = min(args.depths)
        hi = max((d for d in args.depths if d <= 64), default=max(args.depths))
        mem_growth = rows[hi][0]["reversible"] / rows[lo][0]["reversible"]
        store_growth = rows[hi][0]["store"] / rows[lo][0]["store"]
        worst_time = max(r[1]["reversible"] / r[1]["store"] for r in rows.values())
        summary.append((name, mem_growth, worst_time))
        write_json()
        print(f"{'':<12} saved bytes depth {hi} / depth {lo}: reversible {mem_growth:.3f} (goal <= 1.2), "
              f"store {store_growth:.2f}; worst time ratio reversible/store {worst_time:.2f} (goal <= 1.6)")
    ok = all(m <= 1.2 and t <= 1.6 for _, m, t in summary)
    print("goals " + ("met" if ok else "NOT met") + ": " + ", ".join(
        f"{n} memory x{m:.2f} time x{t:.2f}" for n, m, t in summary))


if __name__ == "__main__":
    main()

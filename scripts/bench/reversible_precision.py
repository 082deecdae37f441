#!/usr/bin/env python
"""Reversible against stored-activation gradients by depth, in float32 (TF32 off and on) and under bf16.

For each model (``hamiltonian``, ``midpoint``, ``leapfrog``: the reversible schemes on the
paper's fields; ``euler`` on ``conv_act`` as a store-only control) and each depth N, one
stage alone (no opening layer or classifier, so nothing else rounds): N steps over T = 1,
channels x size x size states, a fixed batch y_0 and loss = sum(w * y_N) with fixed random w.
The gradients with respect to y_0 and every step parameter are compared, as the largest
difference over the largest entry (max |a - b| / max |b|), between

- ``store`` and ``reversible`` backprop in the same arithmetic (rev/store), and
- each of them and the float64 gradients of the same stage (store/ref, rev/ref).

Arithmetics (columns):

- ``fp32``: float32 with IEEE convolutions (``torch.backends.cudnn.conv.fp32_precision='ieee'``);
- ``tf32 opt-in`` (CUDA only): TF32 convolutions everywhere, reversible stages allowed to use them
  (``trainer.reversible_tf32=true``);
- ``tf32 policy`` (CUDA only): TF32 convolutions globally, the reversible stage under msnet's
  default (IEEE float32 inside it): rev/ref should match ``fp32``'s, while store keeps TF32's error;
- ``bf16``: ``torch.autocast(bfloat16)``, y_0 handed in as bf16 as the opening layer would under
  autocast (every stage keeps a float32 state; F runs in bf16).

On the CPU only ``fp32`` and ``bf16`` exist (no TF32); the reference is float64 on the same device.

    .venv/bin/python scripts/bench/reversible_precision.py                          # GPU: depths 4 16 64 256
    .venv/bin/python scripts/bench/reversible_precision.py --depths 2 4 --channels 4 --size 8 --batch 2   # toy, any device
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

from msnet.core import INTEGRATORS, RESIDUALS, ODEBlock, resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import residual_for  # noqa: E402  (the paper's field for each scheme)

MODES = ("fp32", "tf32 opt-in", "tf32 policy", "bf16")
CUDA_ONLY = ("tf32 opt-in", "tf32 policy")


@contextmanager
def conv_precision(value: str) -> Iterator[None]:
    """The global cuDNN convolution precision (``"ieee"`` or ``"tf32"``) inside the block, restored after."""
    conv = torch.backends.cudnn.conv
    saved = conv.fp32_precision
    conv.fp32_precision = value
    try:
        yield
    finally:
        conv.fp32_precision = saved


def make_block(name: str, depth: int, channels: int, backprop: str) -> ODEBlock:
    torch.manual_seed(0)
    residual = RESIDUALS.get(residual_for(name))(channels, "tanh")
    return ODEBlock(residual, INTEGRATORS.get(name)(), depth, 1.0, backprop)


def gradients(block: ODEBlock, y0: torch.Tensor, w: torch.Tensor, bf16: bool) -> torch.Tensor:
    """d(sum(w * y_N)) / d(y_0, every step parameter), concatenated, float64 on the CPU."""
    block.zero_grad(set_to_none=True)
    y = y0.detach().clone().requires_grad_(True)
    with torch.autocast(y0.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = block(y.bfloat16() if bf16 else y)
    (out.to(w.dtype) * w).sum().backward()
    return torch.cat([y.grad.flatten()] + [p.grad.flatten() for p in block.parameters()]).double().cpu()


def rel(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[float]:
    if a is None or b is None:
        return None
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def measure(name: str, depth: int, args, device: torch.device) -> Dict[str, Optional[float]]:
    """One row: for each mode, rev/store, store/ref and rev/ref."""
    g = torch.Generator().manual_seed(1)
    shape = (args.batch, args.channels, args.size, args.size)
    y0, w = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    reversible = INTEGRATORS.get(name).reversible
    blocks = {bp: make_block(name, depth, args.channels, bp).to(device) for bp in
              (("store", "reversible") if reversible else ("store",))}
    ref_block = make_block(name, depth, args.channels, "store").to(device=device, dtype=torch.float64)
    with conv_precision("ieee"):
        ref = gradients(ref_block, y0.to(device), w.to(device), bf16=False)
    x, wf = y0.float().to(device), w.float().to(device)
    row: Dict[str, Optional[float]] = {}
    for mode in MODES:
        if mode in CUDA_ONLY and device.type != "cuda":
            continue
        conv = "tf32" if mode.startswith("tf32") else "ieee"
        grads = {}
        for bp, block in blocks.items():
            block.reversible_tf32 = mode == "tf32 opt-in"
            with conv_precision(conv):
                grads[bp] = gradients(block, x, wf, bf16=mode == "bf16")
        store, rev = grads["store"], grads.get("reversible")
        row[f"{mode} rev/store"] = rel(rev, store)
        row[f"{mode} store/ref"] = rel(store, ref)
        row[f"{mode} rev/ref"] = rel(rev, ref)
    return row


def fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[n for n in INTEGRATORS.names() if INTEGRATORS.get(n).reversible]
                    + ["euler"])
    ap.add_argument("--depths", nargs="+", type=int, default=[4, 16, 64, 256])
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--size", type=int, default=28, help="state side, pixels")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, default=None, help="write the rows and the setting here")
    args = ap.parse_args()

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{datetime.date.today()}  {name}  torch {torch.__version__}; one stage, {args.channels} channels, "
          f"{args.size}x{args.size}, batch {args.batch}, T = 1; max |a - b| / max |b| of d(sum w y_N)/d(y_0, params)")
    rows: List[Dict] = []
    columns: List[str] = []
    for model in args.models:
        for depth in args.depths:
            row = {"model": model, "depth": depth, **measure(model, depth, args, device)}
            rows.append(row)
            if not columns:
                columns = list(row)
                print("  ".join(f"{c:>18}" for c in columns))
            print("  ".join(f"{(fmt(row[c]) if isinstance(row[c], float) or row[c] is None else row[c]):>18}"
                            for c in columns), flush=True)
            if args.json:  # after every row: a run cut short keeps what it measured
                args.json.write_text(json.dumps({
                    "script": "reversible_precision", "date": str(datetime.date.today()), "device": name,
                    "torch": torch.__version__, "setting": {k: v for k, v in vars(args).items() if k != "json"},
                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

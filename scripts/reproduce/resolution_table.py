#!/usr/bin/env python
"""Tabulate a scripts/reproduce/haber2017_resolution.sh output folder beside the paper's numbers.

    .venv/bin/python scripts/reproduce/resolution_table.py OUT

Reads OUT/{coarse,fine}/JOB/{config.yaml,summary.json} and OUT/{coarse_to_fine,fine_to_coarse}/JOB/transfer.json,
prints (1) every setting's validation accuracies (the "smoothed" columns: the fine images
smoothed by the Gaussian the coarse images got before R; "fitted": the Galerkin stencils refitted
on 256 training images, msnet.multigrid.datafit; empty for outputs made before msnet transfer
measured them) and (2) the paper's table beside msnet's for
the setting with the best validation accuracy of coarse->fine stencil transfer, and writes
OUT/table.md and OUT/table.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

# Haber et al. 2018, Sec. 4 (MNIST, 2 layers, BCD optimiser): validation accuracies.
PAPER = {
    "native coarse (14x14)": 0.9828,
    "native fine (28x28)": 0.9818,
    "coarse->fine, stencil prolongation": 0.910,
    "coarse->fine, same kernels": 0.610,
    "fine->coarse, stencil restriction": 0.949,
    "fine->coarse, same kernels": 0.841,
}


def load(out: Path):
    rows = []
    for job in sorted((out / "coarse").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 1 << 30):
        if not job.name.isdigit():
            continue
        i = job.name
        files = {
            "coarse": out / "coarse" / i / "summary.json", "fine": out / "fine" / i / "summary.json",
            "c2f": out / "coarse_to_fine" / i / "transfer.json", "f2c": out / "fine_to_coarse" / i / "transfer.json",
        }
        if not all(f.exists() for f in files.values()):
            continue
        data = {k: json.loads(f.read_text()) for k, f in files.items()}
        cfg = yaml.safe_load((out / "coarse" / i / "config.yaml").read_text())
        # "resampled images -> 14x14" and "stencil transfer, fitted on N training images" by their stem
        stem = lambda m: m.split(" ->")[0].split(" on ")[0]  # noqa: E731
        by = lambda t: {stem(r["method"]): r for r in data[t]["results"]}  # noqa: E731
        c2f, f2c = by("c2f"), by("f2c")
        rows.append({
            "job": i,
            "layers": cfg["model"]["layers"], "T": cfg["model"]["T"], "activation": cfg["model"]["activation"],
            "reg_W": cfg["regularizer"]["classifier_smoothness"], "reg_K": cfg["regularizer"]["stencil_smoothness"],
            "dataset": cfg["dataset"]["name"],
            "coarse_val": data["coarse"]["final_val_acc"], "coarse_test": data["coarse"]["final_test_acc"],
            "fine_val": data["fine"]["final_val_acc"], "fine_test": data["fine"]["final_test_acc"],
            **{f"c2f_{k}_{s}": c2f[m][f"{s}_acc"] if m in c2f else None
               for k, m in (("stencil", "stencil transfer"), ("fit", "stencil transfer, fitted"),
                            ("naive", "naive kernel reuse"), ("resample", "resampled images"),
                            ("stencil_smooth", "stencil transfer, smoothed images"),
                            ("naive_smooth", "naive kernel reuse, smoothed images")) for s in ("val", "test")},
            **{f"f2c_{k}_{s}": f2c[m][f"{s}_acc"] if m in f2c else None
               for k, m in (("stencil", "stencil transfer"), ("fit", "stencil transfer, fitted"),
                            ("naive", "naive kernel reuse"), ("resample", "resampled images")) for s in ("val", "test")},
        })
    return rows


def pct(x):
    return "" if x is None else f"{100 * x:.1f}%"


def main() -> None:
    out = Path(sys.argv[1])
    rows = load(out)
    if not rows:
        sys.exit(f"error: no complete settings under {out}")
    console = Console(record=True, width=240)
    grid = Table(title=f"every setting (validation accuracy), {rows[0]['dataset']}")
    cols = [("layers", "layers"), ("T", "T"), ("activation", "σ"), ("reg_W", "‖∇W‖² weight"), ("reg_K", "‖ΔK‖² weight"), ("coarse_val", "coarse"), ("fine_val", "fine"),
            ("c2f_stencil_val", "c→f stencil"), ("c2f_fit_val", "c→f stencil, fitted"), ("c2f_naive_val", "c→f same kernels"), ("c2f_resample_val", "c→f resample"),
            ("c2f_stencil_smooth_val", "c→f stencil, smoothed"), ("c2f_naive_smooth_val", "c→f same, smoothed"),
            ("f2c_stencil_val", "f→c stencil"), ("f2c_fit_val", "f→c stencil, fitted"), ("f2c_naive_val", "f→c same kernels"), ("f2c_resample_val", "f→c resample")]
    for _, name in cols:
        grid.add_column(name, justify="right")
    for r in rows:
        grid.add_row(*[pct(r[k]) if k.endswith("_val") else str(r[k]) for k, _ in cols])
    console.print(grid)

    best = max(rows, key=lambda r: r["c2f_stencil_val"])
    head = Table(title=f"paper (MNIST, val) vs msnet ({best['dataset']}, test; setting chosen on val: "
                       f"layers={best['layers']}, T={best['T']}, {best['activation']}, ‖∇W‖² weight={best['reg_W']}, "
                       f"‖ΔK‖² weight={best['reg_K']})")
    head.add_column("quantity")
    head.add_column("paper", justify="right")
    head.add_column("msnet val", justify="right")
    head.add_column("msnet test", justify="right")
    mine = {
        "native coarse (14x14)": ("coarse_val", "coarse_test"),
        "native fine (28x28)": ("fine_val", "fine_test"),
        "coarse->fine, stencil prolongation": ("c2f_stencil_val", "c2f_stencil_test"),
        "coarse->fine, stencil prolongation, fitted": ("c2f_fit_val", "c2f_fit_test"),
        "coarse->fine, same kernels": ("c2f_naive_val", "c2f_naive_test"),
        "coarse->fine, resampled images": ("c2f_resample_val", "c2f_resample_test"),
        "coarse->fine, stencil, smoothed images": ("c2f_stencil_smooth_val", "c2f_stencil_smooth_test"),
        "coarse->fine, same kernels, smoothed images": ("c2f_naive_smooth_val", "c2f_naive_smooth_test"),
        "fine->coarse, stencil restriction": ("f2c_stencil_val", "f2c_stencil_test"),
        "fine->coarse, stencil restriction, fitted": ("f2c_fit_val", "f2c_fit_test"),
        "fine->coarse, same kernels": ("f2c_naive_val", "f2c_naive_test"),
        "fine->coarse, resampled images": ("f2c_resample_val", "f2c_resample_test"),
    }
    for q, (v, t) in mine.items():
        head.add_row(q, pct(PAPER.get(q)), pct(best[v]), pct(best[t]))
    console.print(head)
    (out / "table.json").write_text(json.dumps({"settings": rows, "chosen": best, "paper": PAPER}, indent=2))
    (out / "table.md").write_text(console.export_text())
    print(f"written: {out / 'table.md'}, {out / 'table.json'}")


if __name__ == "__main__":
    main()

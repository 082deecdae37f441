#!/usr/bin/env python
"""Figure 2 of Haber et al. 2018 from a scripts/reproduce/haber2017_depth.sh output folder.

    .venv/bin/python scripts/reproduce/depth_figure.py OUT

Reads OUT/multiscale/metrics.jsonl (one +depth=doubling run) and OUT/random/*/metrics.jsonl
(one run per depth), plots validation accuracy and loss against iterations (mini-batches)
for each depth, multiscale against random initialisation, and writes OUT/fig2_depth.png,
OUT/table.md and OUT/table.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from msnet.runs import read_metrics  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402


def curves(records, batches_per_epoch):
    """{layers: [(iteration, val_acc, val_loss), ...]} from metrics records."""
    out = {}
    for r in records:
        if r.get("val_acc") is None:
            continue
        layers = r["layers"][0]
        out.setdefault(layers, []).append((r["level_epoch"] * batches_per_epoch, r["val_acc"], r["val_loss"]))
    return out


def main() -> None:
    out = Path(sys.argv[1])
    summary = json.loads((out / "multiscale" / "summary.json").read_text())
    config = OmegaConf.load(out / "multiscale" / "config.yaml")  # the batch size: 128, or e.g. 800 for optimizer=bcd
    bpe = -(-summary["data_sizes"]["train"] // int(config.trainer.batch_size))
    multi = curves(read_metrics(out / "multiscale"), bpe)
    rand = {}
    for job in sorted((out / "random").iterdir()):
        if (job / "metrics.jsonl").exists():
            rand.update(curves(read_metrics(job), bpe))
    depths = sorted(set(multi) & set(rand))
    if not depths:
        sys.exit(f"error: no depth has both runs under {out}")

    fig, axes = plt.subplots(2, len(depths), figsize=(3.2 * len(depths), 5.5), squeeze=False)
    for k, d in enumerate(depths):
        for name, data, style in (("multiscale", multi[d], "C0-o"), ("random", rand[d], "C1-s")):
            it = [p[0] for p in data]
            axes[0, k].plot(it, [100 * p[1] for p in data], style, ms=3, label=name)
            axes[1, k].plot(it, [p[2] for p in data], style, ms=3, label=name)
        axes[0, k].set_title(f"{d} layers")
        axes[1, k].set_xlabel("iterations")
    axes[0, 0].set_ylabel("validation accuracy [%]")
    axes[1, 0].set_ylabel("validation loss")
    axes[0, 0].legend()
    fig.suptitle(f"shallow-to-deep: multiscale vs random initialisation ({summary['dataset']}, "
                 f"{summary['data_sizes']['train']} training images)")
    fig.tight_layout()
    fig.savefig(out / "fig2_depth.png", dpi=110)

    console = Console(record=True, width=140)
    table = Table(title="validation accuracy / loss per depth: at the start (iteration 0) and at the end")
    for c in ("layers", "multiscale start", "random start", "multiscale end", "random end",
              "multiscale end loss", "random end loss"):
        table.add_column(c, justify="right")
    rows = []
    for d in depths:
        m, r = multi[d], rand[d]
        row = {"layers": d, "multi_start": m[0][1], "random_start": r[0][1], "multi_end": m[-1][1],
               "random_end": r[-1][1], "multi_end_loss": m[-1][2], "random_end_loss": r[-1][2]}
        rows.append(row)
        table.add_row(str(d), f"{100 * m[0][1]:.1f}%", f"{100 * r[0][1]:.1f}%", f"{100 * m[-1][1]:.1f}%",
                      f"{100 * r[-1][1]:.1f}%", f"{m[-1][2]:.4f}", f"{r[-1][2]:.4f}")
    console.print(table)
    (out / "table.md").write_text(console.export_text())
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    print(f"written: {out / 'fig2_depth.png'}, {out / 'table.md'}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Single-level against MG/OPT training from a scripts/reproduce/gaedke2020.sh output folder.

    .venv/bin/python scripts/reproduce/gaedke2020_figure.py OUT

Reads OUT/single and OUT/mgopt (two ``msnet train`` run directories: metrics.jsonl, config.yaml,
summary.json). Work is counted in fine-gradient equivalents (FGE): the single-level run spends
one per mini-batch, the MG/OPT run's epoch records carry its cumulative ``work_fge``
(msnet/methods/mgopt.py). Training time is the sum of the epochs' ``epoch_time_s`` (validation
excluded). The target is the single-level run's plateau (mean validation accuracy of its last
three epochs) minus 0.5 points. Writes OUT/gaedke2020.png (validation accuracy against work and
against training time), OUT/table.md and OUT/table.json, and prints the table with the paper's
claim beside msnet's numbers.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from _harness import first_hit, markdown_table, plot_curves, write_md_json
from msnet.runs import read_metrics

PAPER = "> 3x (abstract: \"a speedup of more than factor three while achieving the same validation accuracy\")"


def curve(run: Path) -> List[Dict[str, Any]]:
    """[(epoch, fge, train_s, val_acc)] of a run, with its epoch-0 point when it has one."""
    cfg = OmegaConf.load(run / "config.yaml")
    summary = json.loads((run / "summary.json").read_text())
    per_epoch = math.ceil(summary["data_sizes"]["train"] / cfg.trainer.batch_size)
    out, seconds = [], 0.0
    for r in read_metrics(run):
        if r.get("val_acc") is None:
            continue
        if r.get("train_loss") is None:  # the eval_at_start record, before any training
            out.append({"epoch": 0, "fge": 0.0, "train_s": 0.0, "val_acc": r["val_acc"]})
            continue
        seconds += r["epoch_time_s"]
        fge = r["work_fge"] if "work_fge" in r else r["epoch"] * per_epoch
        out.append({"epoch": r["epoch"], "fge": fge, "train_s": seconds, "val_acc": r["val_acc"]})
    return out


def main() -> None:
    out = Path(sys.argv[1])
    curves = {"single-level": curve(out / "single"), "MG/OPT": curve(out / "mgopt")}
    single = curves["single-level"]
    plateau = sum(p["val_acc"] for p in single[-3:]) / len(single[-3:])
    target = plateau - 0.005
    hits = {k: first_hit(v, target) for k, v in curves.items()}
    rows = []
    for name, pts in curves.items():
        h = hits[name]
        rows.append({"run": name, "best val %": f"{100 * max(p['val_acc'] for p in pts):.2f}",
                     "final val %": f"{100 * pts[-1]['val_acc']:.2f}",
                     "epochs to target": h["epoch"] if h else None,
                     "FGE to target": round(h["fge"], 1) if h else None,
                     "train s to target": round(h["train_s"], 1) if h else None,
                     "total FGE": round(pts[-1]["fge"], 1), "total train s": round(pts[-1]["train_s"], 1)})
    s, m = hits["single-level"], hits["MG/OPT"]
    speed = {"work": s["fge"] / m["fge"] if s and m and m["fge"] else None,
             "time": s["train_s"] / m["train_s"] if s and m and m["train_s"] else None}

    table = Table(title=f"to {100 * target:.2f}% validation accuracy (single-level plateau {100 * plateau:.2f}% - 0.5)")
    for c in rows[0]:
        table.add_column(c, justify="left" if c == "run" else "right")
    for r in rows:
        table.add_row(*("" if v is None else str(v) for v in r.values()))
    console = Console(width=160)
    console.print(table)
    verdict = []
    for key, label in (("work", "speedup in work (FGE)"), ("time", "speedup in training time")):
        value = speed[key]
        verdict.append(f"| {label} | {PAPER if key == 'work' else '-'} | "
                       f"{'not reached' if value is None else f'{value:.2f}x'} |")
        console.print(f"{label}: msnet {'MG/OPT did not reach the target' if value is None else f'{value:.2f}x'}"
                      + (f"; paper {PAPER}" if key == "work" else ""))

    md = [*markdown_table(rows), "", "| quantity | paper | msnet |", "|---|---|---|", *verdict]
    written = write_md_json(out, "table", md, {"target": target, "rows": rows, "speedup": speed, "curves": curves})
    if plot_curves(curves, target, out / "gaedke2020.png",
                   "Gaedke-Merzhäuser et al. 2020: single-level vs MG/OPT training (msnet)",
                   [("fge", "work (fine-gradient equivalents)"), ("train_s", "training time (s)")]):
        written.insert(0, out / "gaedke2020.png")
    console.print("written: " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()

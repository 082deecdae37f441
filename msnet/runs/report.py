"""``msnet report DIR``: one table of every run under DIR, with the config keys that differ as columns."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from msnet import MsnetError

METRIC_COLUMNS = [
    "status", "epochs", "final_val_acc", "final_test_acc", "final_test_loss", "best_val_acc", "wall_time_s",
]
IGNORED_KEYS = ("resume", "dataset.root", "threads")


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def collect_runs(root: str | Path) -> List[Dict[str, Any]]:
    """Every run under ``root`` (a folder holding ``summary.json``), with its flattened config and summary."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MsnetError(f"{root} is not a folder; pass a run, sweep or outputs folder (e.g. msnet report multirun)")
    runs = []
    for summary_path in sorted(root.rglob("summary.json")):
        run_dir = summary_path.parent
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            continue
        config_path = run_dir / "config.yaml"
        config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
        runs.append({"dir": run_dir, "summary": summary, "config": _flatten(config or {})})
    if not runs:
        raise MsnetError(f"no runs under {root} (no summary.json found); point msnet report at an outputs or multirun folder")
    return runs


def report_rows(runs: List[Dict[str, Any]], root: Path) -> Tuple[List[str], List[Dict[str, Any]]]:
    """Columns (run, differing config keys, metrics) and one row per run."""
    keys = sorted(set().union(*(r["config"].keys() for r in runs)))
    differing = [
        k for k in keys
        if not k.startswith(IGNORED_KEYS) and len({json.dumps(r["config"].get(k), sort_keys=True) for r in runs}) > 1
    ]
    metrics = [m for m in METRIC_COLUMNS if any(m in r["summary"] for r in runs)]
    rows = []
    for r in runs:
        row: Dict[str, Any] = {"run": str(r["dir"].relative_to(root)) if r["dir"] != root else "."}
        row.update({k: r["config"].get(k) for k in differing})
        row.update({m: r["summary"].get(m) for m in metrics})
        rows.append(row)
    return ["run", *differing, *metrics], rows


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def write_report(root: Path, columns: List[str], rows: List[Dict[str, Any]]) -> Tuple[Path, Path]:
    """Write ``report.csv`` and ``report.md`` into ``root``."""
    csv_path, md_path = root / "report.csv", root / "report.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({c: row.get(c) for c in columns})
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def report(root: str | Path, sort: Optional[str] = None) -> Tuple[List[str], List[Dict[str, Any]]]:
    """Collect, tabulate and write the report for ``root``; returns ``(columns, rows)``."""
    root = Path(root).expanduser()
    runs = collect_runs(root)
    columns, rows = report_rows(runs, root)
    if sort:
        if sort not in columns:
            raise MsnetError(f"cannot sort by {sort!r}; columns are: {', '.join(columns)}")
        rows.sort(key=lambda r: (r.get(sort) is None, r.get(sort)))
    write_report(root, columns, rows)
    return columns, rows

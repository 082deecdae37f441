"""msnet report: differing config keys become columns; CSV and Markdown land in the folder."""

from __future__ import annotations

import csv

import pytest

from msnet import MsnetError
from msnet.runs.report import report
from msnet.training import train


def test_report_over_runs(tiny_cfg, tmp_path):
    for layers in (1, 2):
        train(tiny_cfg([f"model.layers={layers}", "trainer.epochs=1"]), tmp_path / "sweep" / f"job{layers}")
    columns, rows = report(tmp_path / "sweep", sort="model.layers")
    assert columns[0] == "run" and "model.layers" in columns and "final_test_acc" in columns
    assert "seed" not in columns  # equal in every run, so not a column
    assert [r["model.layers"] for r in rows] == [1, 2]
    with open(tmp_path / "sweep" / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert md.startswith("| run |") and "job1" in md and "job2" in md


def test_report_errors(tmp_path):
    with pytest.raises(MsnetError, match="not a folder"):
        report(tmp_path / "none")
    with pytest.raises(MsnetError, match="no runs under"):
        report(tmp_path)


def _fake_run(path, lr: float, acc: float) -> None:
    import json

    import yaml

    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "optimizer": {"lr": lr}}))
    (path / "summary.json").write_text(json.dumps({"status": "completed", "final_test_acc": acc}))


def test_report_shows_config_values_as_typed_and_metrics_rounded(tmp_path):
    from rich.console import Console

    from msnet.runs.display import records_table
    from msnet.runs.report import setting_columns

    lrs = (3e-05, 1.2e-4, 1.4e-4, 0.00125, 0.00126)
    for i, lr in enumerate(lrs):
        _fake_run(tmp_path / str(i), lr, 0.123456 + i)
    columns, rows = report(tmp_path)
    assert setting_columns(columns) == ["optimizer.lr"]
    md = (tmp_path / "report.md").read_text().splitlines()[2:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in md]
    assert [c[1] for c in cells] == ["3e-05", "0.00012", "0.00014", "0.00125", "0.00126"]  # distinct, as typed
    assert [c[-1] for c in cells] == [f"{0.123456 + i:.4f}" for i in range(5)]  # metrics keep 4 decimals
    console = Console(width=200, record=True)
    console.print(records_table("t", rows, columns, exact=setting_columns(columns)))
    shown = console.export_text()
    assert all(text in shown for text in ("3e-05", "0.00012", "0.00014", "0.00125", "0.00126", "0.1235"))

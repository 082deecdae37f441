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

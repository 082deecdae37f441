"""scripts/bench/bench_pyramid.py as a user runs it: one interleaved pair of runs per seed, each ratio and their median."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_pyramid_reports_every_seed_and_the_median(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench" / "bench_pyramid.py"), "--train-subset", "256", "--channels", "2",
           "--layers", "1", "--seeds", "0,1", "--threads", "1", "--pyramid", "2level_block", "--out", str(out),
           "dataset=synthetic", "dataset.image_size=16", "pyramid.epochs=[1,1]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "bench_pyramid.json").read_text())
    assert [r["seed"] for r in report["results"]] == [0, 1]
    ratios = []
    for r in report["results"]:
        single, pyramid = r["curves"]["single"], r["curves"]["pyramid"]
        assert r["target"] == pytest.approx(single[-1]["val_acc"] - 0.005)
        # the reported time to target is the first full-resolution evaluation at or above it
        hits = [c["train_s"] for c in pyramid if c.get("down", 0) == 0 and c["val_acc"] >= r["target"]]
        assert r["pyramid_to_target_s"] == (hits[0] if hits else None)
        assert r["single_to_target_s"] == next(c["train_s"] for c in single if c["val_acc"] >= r["target"])
        # 1 epoch at 8x8 and 1 at 16x16 for the pyramid, 2 at 16x16 for the single-level run, 4 evaluations each
        assert [c["down"] for c in pyramid if "prolonged" not in c["run"]] == [1] * 4 + [0] * 4 and len(single) == 8
        ratios.append(float("inf") if r["ratio"] is None else r["ratio"])
        if r["ratio"] is not None:
            assert r["ratio"] == pytest.approx(r["pyramid_to_target_s"] / r["single_to_target_s"])
    median = statistics.median(ratios)
    assert report["median_ratio"] == (None if median == float("inf") else pytest.approx(median))
    assert "median ratio pyramid / single" in (out / "bench_pyramid.md").read_text()

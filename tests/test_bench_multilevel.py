"""scripts/bench/bench_depth.py and bench_mgopt.py as a user runs them: learning-rate grids for the baselines, the
target and the baseline chosen from the grid, and the ratios printed as the last lines (issue 22)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(name: str, args: list, tmp_path: Path) -> tuple:
    out = tmp_path / name
    cmd = [sys.executable, str(ROOT / "scripts" / "bench" / f"{name}.py"), "--dataset", "synthetic", "--threads", "1",
           "--out", str(out), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / f"{name}.json").read_text()), proc.stdout.strip().splitlines()


@pytest.mark.slow
def test_bench_depth_tunes_both_runs_and_reports_the_fastest_of_each(tmp_path):
    report, lines = bench("bench_depth", ["--final-depth", 4, "--epochs", 1, "--shallow", 0.25, "--train-subset", 256,
                                          "--val-size", 100, "--channels", 2, "--evals-per-epoch", 2,
                                          "--lrs", "1e-3,4e-3,1e-2", "--cascade-lrs", "4e-3,1e-2"], tmp_path)
    traces = report["traces"]
    assert sorted(traces) == sorted(["random lr 0.001", "random lr 0.004", "random lr 0.01", "cascade lr 0.004",
                                     "cascade lr 0.01"])
    randoms = [k for k in traces if k.startswith("random")]
    assert report["target"] == pytest.approx(max(traces[k][-1]["val_acc"] for k in randoms) - 0.005)
    # a cascade level of 2 layers with 0.25 final-depth epochs trains 0.5 epochs (split in two evaluations), then 4
    for k in traces:
        if k.startswith("cascade"):
            assert [p["layers"] for p in traces[k]][:3] == [2, 2, 4]

    def hit(k):
        return next((p["train_s"] for p in traces[k] if p["layers"] == 4 and p["val_acc"] >= report["target"]), None)

    fastest = {kind: min((k for k in traces if k.startswith(kind) and hit(k) is not None), key=hit, default=None)
               for kind in ("random", "cascade")}
    assert report["best"].get("random") == fastest["random"] and report["best"].get("cascade") == fastest["cascade"]
    if report["ratio"] is None:
        assert lines[-1].startswith("no cascade reached the target")
    else:
        assert report["ratio"] == pytest.approx(hit(fastest["cascade"]) / hit(fastest["random"]))
        assert re.match(rf"ratio cascade / random = {report['ratio']:.3f}", lines[-1] if "ratio" in lines[-1]
                        else lines[-2])


@pytest.mark.slow
def test_bench_mgopt_tunes_the_baseline_and_prints_each_methods_ratios_last(tmp_path):
    report, lines = bench("bench_mgopt", ["--layers", 4, "--levels", 2, "--channels", 2, "--train-subset", 256,
                                          "--val-size", 100, "--epochs", 2, "--eval-every", 1], tmp_path)
    traces = report["traces"]
    singles = [k for k in traces if k.startswith("single")]
    assert singles == ["single lr 0.001", "single lr 0.002", "single lr 0.004"] and list(traces)[3:] == ["MG/OPT", "RMTR"]
    plateau = max(sum(p["val_acc"] for p in traces[k][-3:]) / 3 for k in singles)
    assert report["target"] == pytest.approx(plateau - 0.005)
    # every single run spends 1 FGE per batch, the multilevel runs their own count, within 1.5x the single budget
    for k in singles:
        assert [p["fge"] for p in traces[k]] == [p["batches"] for p in traces[k]]
    budget = traces[singles[0]][-1]["fge"]
    for k in ("MG/OPT", "RMTR"):
        assert traces[k][-2]["fge"] < 1.5 * budget and traces[k][-1]["fge"] > traces[k][1]["batches"]

    def hit(k):
        return next((p for p in traces[k] if p["val_acc"] >= report["target"]), None)

    base = min((k for k in singles if hit(k)), key=lambda k: (hit(k)["fge"], hit(k)["train_s"]))
    assert [r["run"] for r in report["rows"]].count(f"{base} (baseline)") == 1
    for line, k in zip(lines[-2:], ("MG/OPT", "RMTR")):
        assert line.startswith(f"{k}: ")
        if hit(k) is None:
            assert "did not reach the target" in line
        else:
            assert f"FGE ratio {base} / {k} = {hit(base)['fge'] / hit(k)['fge']:.2f}" in line
            assert f"wall-time ratio = {hit(base)['train_s'] / hit(k)['train_s']:.2f}" in line


@pytest.mark.slow
def test_bench_mgopt_nested_iteration_banks_each_depths_work_at_its_cost(tmp_path):
    """MG/OPT started from a shallower network (``+depth=doubling`` in ``--mgopt-extra``): the rule is rebuilt at
    each depth, and the trace keeps the shallow level's work, each cycle at half the depth counting half as much."""
    report, lines = bench("bench_mgopt", ["--method", "mgopt", "--layers", 4, "--levels", 2, "--channels", 2,
                                          "--train-subset", 256, "--val-size", 100, "--epochs", 3, "--eval-every", 1,
                                          "--budget-factor", 3, "--mgopt-extra", "+depth=doubling", "depth.start=2",
                                          "depth.stop=4", "depth.sizing=epochs", "depth.epochs=[1,2]",
                                          "--cascade-extra", "+depth=doubling", "depth.start=2", "depth.stop=4",
                                          "depth.sizing=epochs", "depth.epochs=[1,2]"], tmp_path)
    cascade = report["traces"]["cascade"]  # the single-level control: one gradient of the current depth per batch
    steps = [(p["layers"], b["fge"] - a["fge"], b["batches"] - a["batches"]) for a, b, p in
             zip(cascade, cascade[1:], cascade[1:]) if b["batches"] > a["batches"]]
    assert {d for d, _, _ in steps} == {2, 4}
    assert all(df == pytest.approx(db * d / 4) for d, df, db in steps)
    trace = report["traces"]["MG/OPT"]
    assert [p["layers"] for p in trace][:4] == [2, 2, 2, 4]
    fge = [p["fge"] for p in trace]
    assert all(b >= a for a, b in zip(fge, fge[1:]))  # never reset by the new rule at 4 layers
    shallow = [b - a for a, b, p in zip(fge, fge[1:], trace[1:]) if p["layers"] == 2]
    deep = [b - a for (a, q), (b, p) in zip(zip(fge, trace), zip(fge[1:], trace[1:])) if q["layers"] == p["layers"] == 4]
    assert shallow and deep
    assert shallow[0] == pytest.approx(deep[0] / 2)  # same cycle, half the layers: half the fine-gradient cost
    row = next(r for r in report["rows"] if r["run"] == "MG/OPT")
    hit = next((p for p in trace if p["layers"] == 4 and p["val_acc"] >= report["target"]), None)
    assert row["fge_to_target"] == (round(hit["fge"], 1) if hit else None)  # the target counts at full depth only
    assert lines[-2].startswith("MG/OPT:") and lines[-1].startswith("cascade:")


def test_nest_flag_builds_the_f_cycle_schedule_and_refuses_a_depth_that_does_not_halve_to_it():
    """``--nest S``: 2 epochs at S layers, 1 at each deeper shallow depth, in epochs at the full depth's cost
    (the schedules of the map's nested rows), and one line before any data for an S that is not L / 2^k."""
    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    from bench_mgopt import nested

    assert nested(16, 64, 38)[-1] == "depth.epochs=[0.5,0.5,38]"
    assert nested(32, 256, 30) == ["+depth=doubling", "depth.start=32", "depth.stop=256", "depth.sizing=cost",
                                   "depth.epochs=[0.25,0.25,0.5,30]"]
    assert nested(2, 4, 3)[-1] == "depth.epochs=[1,3]"
    script = str(ROOT / "scripts" / "bench" / "bench_mgopt.py")
    for bad in (("--nest", "12"), ("--nest", "64"), ("--layers", "48", "--nest", "16")):
        proc = subprocess.run([sys.executable, script, "--quick", *bad], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr.strip().startswith("bench_mgopt: error: --nest") and len(proc.stderr.strip().splitlines()) == 1

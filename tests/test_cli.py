"""The installed ``msnet`` command, run as a user would, in a subprocess."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "dataset=synthetic", "dataset.n_train=400", "dataset.n_test=100", "dataset.val_size=100",
    "dataset.image_size=8", "model.channels=4", "trainer.epochs=1", "trainer.batch_size=100", "device=cpu",
]


def msnet(*args: str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("msnet")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "msnet"]
    proc = subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"msnet {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.slow
def test_help_and_cfg(tmp_path):
    top = msnet("--help", cwd=tmp_path).stdout
    assert "train" in top and "evaluate" in top and "report" in top
    train_help = msnet("train", "--help", cwd=tmp_path).stdout
    assert "dataset: cifar10, fashion_mnist, mnist, npz, synthetic" in train_help
    job = msnet("train", "--cfg", "job", "model.layers=8", cwd=tmp_path).stdout
    assert "layers: 8" in job and not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_sweep_then_report(tmp_path):
    msnet("train", "-m", "model.layers=1,2", "seed=0,1", *TINY, "hydra.sweep.dir=sweep", cwd=tmp_path)
    jobs = sorted(p.parent for p in (tmp_path / "sweep").rglob("summary.json"))
    assert len(jobs) == 4
    seen = set()
    for job in jobs:
        cfg = (job / "config.yaml").read_text()
        typed = (job / ".hydra" / "config.yaml").read_text()
        layers, seed = cfg.split("layers: ")[1].split()[0], int(cfg.split("\nseed: ")[1].split()[0])
        typed_seed = int(typed.split("\nseed: ")[1].split()[0])
        seen.add((layers, typed_seed))
        assert seed == typed_seed  # the typed seed is the seed used
        assert (job / "command.txt").read_text().split() == ["msnet", "train", f"model.layers={layers}",
                                                             f"seed={seed}", *TINY]  # the job alone
        assert json.loads((job / "summary.json").read_text())["status"] == "completed"
        assert (job / "checkpoints" / "last.pt").exists() and (job / "metrics.jsonl").exists()
    assert seen == {("1", 0), ("1", 1), ("2", 0), ("2", 1)}
    out = msnet("report", "sweep", cwd=tmp_path).stdout
    assert "4 runs under sweep" in out
    with open(tmp_path / "sweep" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {"model.layers", "seed", "final_test_acc"} <= set(rows[0])


@pytest.mark.slow
def test_train_evaluate_resume_round_trip(tmp_path):
    msnet("train", *TINY, "hydra.run.dir=run1", cwd=tmp_path)
    ck = tmp_path / "run1" / "checkpoints" / "last.pt"
    ev = msnet("evaluate", str(ck), "device=cpu", "hydra.run.dir=ev", cwd=tmp_path)
    assert "evaluation" in ev.stdout
    saved = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    summary = json.loads((tmp_path / "run1" / "summary.json").read_text())
    assert {r["split"]: r["acc"] for r in saved["results"]}["test"] == summary["final_test_acc"]
    msnet("train", f"resume={ck}", "trainer.epochs=2", "hydra.run.dir=run2", cwd=tmp_path)
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["epochs"] == 2
    assert (tmp_path / "run2" / "command.txt").read_text().startswith("msnet train resume=")


@pytest.mark.slow
def test_tables_in_full_through_a_pipe(tmp_path):
    """stdout a pipe (as in a log or ``| tee``): no table is cut at rich's default 80 columns."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    train = msnet("train", *TINY, "hydra.run.dir=runs/a", cwd=tmp_path, env=env).stdout
    header = next(line for line in train.splitlines() if "epoch" in line and "level" in line and "┃" in line)
    assert len(header) > 80, header  # wider than rich's default, so the test can fail
    for name in ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s", "final_test_loss", "checkpoint"):
        assert name in train, name
    ckpt = tmp_path / "runs" / "a" / "checkpoints" / "last.pt"
    assert str(ckpt) in train  # the summary's longest cell, whole
    evaluate = msnet("evaluate", str(ckpt), "device=cpu", "hydra.run.dir=ev", cwd=tmp_path, env=env).stdout
    report = msnet("report", "runs", cwd=tmp_path, env=env).stdout
    assert "final_test_acc" in report or "final test" in report, report
    for out in (train, evaluate, report):
        assert "…" not in out, out
    assert (tmp_path / "runs" / "a" / "console.txt").read_text().count("epoch_time_s") == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,match",
    [
        (["train", "model.integrator=nope"], "error: unknown integrator 'nope'; choose one of"),
        (["train", "dataset=npz"], "error: dataset=npz needs a file"),
        (["train", "dataset=mnist", "dataset.root=nodata", "dataset.create_root=true", "dataset.download=false"],
         "error: mnist is not in"),
        (["train", "dataset=mnist", "dataset.root=nodata"], "error: dataset.root=nodata does not exist; point it at"),
        (["evaluate", "ckpt=missing.pt"], "error: checkpoint missing.pt does not exist"),
        (["report", "nowhere"], "error: nowhere is not a folder"),
        (["frobnicate"], "error: unknown command 'frobnicate'"),
        # wrong types, refused by Hydra while composing (msnet.commands.composition_errors_as_lines)
        (["train", "optimizer.lr=abc"], "error: optimizer.lr=abc: optimizer.lr takes a number, e.g. optimizer.lr="),
        (["train", "seed=null"], "error: seed=null: seed takes an integer, e.g. seed=0"),
        (["train", "-m", "model.layers=2", "model.backprop=foo,store"], "error: model.backprop=foo: model.backprop takes one of"),
        (["train", "--cfg", "job", "model.layres=3"], "error: model.layres=3: model has no key 'layres'; did you mean layers?"),
        (["evaluate", "x.pt", "batch_size=big"], "error: batch_size=big: batch_size takes an integer"),
        (["transfer", "--from", "coarse", "--to", "fine", "sigma=wide"], "error: sigma=wide: sigma takes a number"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, match):
    proc = msnet(*args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert match in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len([l for l in proc.stderr.splitlines() if l.strip()]) == 1, proc.stderr


@pytest.mark.slow
def test_unknown_group_option_lists_the_choices(tmp_path):
    proc = msnet("train", "dataset=imagenet", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == ["error: dataset=imagenet: the group dataset has no option 'imagenet'; "
                     "choose one of cifar10, fashion_mnist, mnist, npz, synthetic"], proc.stderr
    proc = msnet("train", "+pyramid=4level", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "choose one of 2level, 2level_block, 3level" in proc.stderr
    proc = msnet("train", "depth.sizing=cost", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: depth.sizing=cost: the group depth is off, so its keys cannot be set; "
                                   "select it first, e.g. +depth=doubling depth.sizing=cost")


@pytest.mark.slow
def test_configs_ship_in_the_wheel(tmp_path):
    """The configs are found from an installed wheel, not only from a checkout."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True, capture_output=True, timeout=600,
    )
    wheel = next((tmp_path / "dist").glob("msnet-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"msnet/conf/train.yaml", "msnet/conf/dataset/fashion_mnist.yaml", "msnet/conf/hydra/default.yaml",
            "msnet/conf/hydra/launcher/joblib.yaml", "msnet/conf/hydra/launcher/submitit_slurm.yaml"} <= set(names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = (
        "import msnet, sys; assert msnet.__file__.startswith(sys.argv[1]), msnet.__file__;"
        "from msnet.cli import main; sys.argv=['msnet','train','--cfg','job']; main();"
        "sys.argv=['msnet','train','--cfg','hydra','hydra/launcher=joblib']; main()"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "integrator: euler" in out.stdout
    assert "JoblibLauncher\n    n_jobs: 2" in out.stdout  # msnet's launcher preset, from the wheel


@pytest.mark.slow
def test_pyramid_then_transfer_as_typed(tmp_path):
    tiny16 = [a if a != "dataset.image_size=8" else "dataset.image_size=16" for a in TINY]
    out = msnet("train", "+pyramid=2level", "pyramid.epochs=[1,1]", *tiny16, cwd=tmp_path).stdout
    assert "coarse 8x8" in out and "fine 16x16" in out
    proc = msnet("transfer", "--from", "fine", "--to", "coarse", "device=cpu", cwd=tmp_path)
    assert "using the latest run trained at level fine" in proc.stdout
    assert "stencil transfer" in proc.stdout and "naive kernel reuse" in proc.stdout
    assert list((tmp_path / "outputs" / "transfer").rglob("transferred.pt"))
    bad = msnet("train", "+pyramid=3level", "model=resnet3", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "too deep for 28x28 images" in bad.stderr and "Traceback" not in bad.stderr

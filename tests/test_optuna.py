"""Optuna studies through Hydra's sweeper: ``msnet train -m hydra/sweeper=optuna ...`` returns
``trainer.objective``, a failing trial does not end the study, and ``msnet report`` shows the best trial."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from msnet import MsnetError
from msnet.commands import SweepFailures, check_objective
from msnet.config import Objective, register_configs
from msnet.runs.report import optuna_studies, report
from tests.test_cli import TINY, msnet

pytestmark = pytest.mark.filterwarnings(r"ignore:\s*'hydra/(launcher|sweeper)/\w+' is validated against ConfigStore")
OPTUNA = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"


@pytest.fixture
def hydra_cfg():
    """``hydra_cfg(overrides)``: the train config with its ``hydra`` node (the Optuna plugin must be installed)."""
    try:
        import hydra_plugins.hydra_optuna_sweeper  # noqa: F401
    except ImportError as err:
        pytest.fail(f"hydra-optuna-sweeper is not installed ({err}); run ./scripts/setup.sh or pip install -e '.[sweep]'")
    register_configs()
    with initialize_config_module(config_module="msnet.conf", version_base="1.3"):
        yield lambda overrides=(): compose("train", list(overrides), return_hydra_config=True)
    HydraConfig.instance().cfg = None


def _as_job(cfg, run_dir: Path, num: int = 0):
    """Set HydraConfig as in job ``num`` of a ``-m`` sweep writing into ``run_dir``; returns the task's config."""
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.job.num = num
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    task = cfg.copy()
    with open_dict(task):
        del task["hydra"]
    run_dir.mkdir(parents=True, exist_ok=True)
    return task


@pytest.mark.parametrize("objective", list(Objective))
def test_the_preset_maximises_accuracies_and_minimises_losses(hydra_cfg, objective):
    cfg = hydra_cfg(["hydra/sweeper=optuna", f"trainer.objective={objective}", "seed=5"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == OPTUNA and sweeper.n_jobs == 1
    assert sweeper.direction == {"acc": "maximize", "loss": "minimize"}[objective.value.rsplit("_", 1)[1]]
    assert Objective(objective).worst == (-math.inf if sweeper.direction == "maximize" else math.inf)
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 5  # the run's seed


def test_samplers_are_seeded_where_they_take_a_seed(hydra_cfg):
    for sampler in ("random", "cmaes", "nsgaii", "motpe"):
        assert hydra_cfg(["hydra/sweeper=optuna", f"hydra/sweeper/sampler={sampler}", "seed=3"]).hydra.sweeper.sampler.seed == 3
    grid = hydra_cfg(["hydra/sweeper=optuna", "hydra/sweeper/sampler=grid"]).hydra.sweeper.sampler
    assert grid._target_ == "optuna.samplers.GridSampler" and "seed" not in grid
    assert hydra_cfg(["hydra/sweeper=optuna", "hydra.sweeper.sampler.seed=7"]).hydra.sweeper.sampler.seed == 7


def test_a_study_job_checks_its_objective_first(hydra_cfg, tmp_path):
    ok = _as_job(hydra_cfg(["hydra/sweeper=optuna"]), tmp_path / "ok")
    check_objective(ok)  # maximise best_val_acc: nothing to say
    wrong = _as_job(hydra_cfg(["hydra/sweeper=optuna", "hydra.sweeper.direction=minimize"]), tmp_path / "wrong")
    with pytest.raises(MsnetError, match=r"^hydra.sweeper.direction=minimize, but trainer.objective=best_val_acc is "
                                         r"to maximize; drop the direction override"):
        check_objective(wrong)
    no_val = _as_job(hydra_cfg(["hydra/sweeper=optuna", "dataset.val_size=0"]), tmp_path / "no_val")
    with pytest.raises(MsnetError, match="dataset.val_size=0 holds out no validation images"):
        check_objective(no_val)
    grid = _as_job(hydra_cfg(["dataset.val_size=0"]), tmp_path / "grid")
    check_objective(grid)  # Hydra's basic sweeper reads no objective


def test_a_study_job_returns_its_objective_or_the_worst_value(hydra_cfg, tmp_path, capsys):
    from msnet.commands.train import main

    base = ["hydra/sweeper=optuna", *TINY, "trainer.progress=false", "threads=1"]
    for objective in ("best_val_acc", "final_val_loss"):
        job = tmp_path / objective
        value = main.__wrapped__(_as_job(hydra_cfg([*base, f"trainer.objective={objective}"]), job))
        assert value == json.loads((job / "summary.json").read_text())[objective]
    failing = _as_job(hydra_cfg([*base, "model.layers=0", "trainer.objective=final_val_loss"]), tmp_path / "bad")
    assert main.__wrapped__(failing) == math.inf  # a loss: the worst is +inf
    assert (tmp_path / "bad" / "error.txt").read_text() == "model.layers must be at least 1, got 0\n"
    assert "error: model.layers must be at least 1, got 0" in capsys.readouterr().err


def test_sweep_failures_after_a_study(tmp_path, capsys):
    from omegaconf import OmegaConf

    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        (sweep / job).mkdir(parents=True)
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    results = sweep / "optimization_results.yaml"
    callback = SweepFailures()
    callback.on_multirun_start(cfg)
    (sweep / "1" / "error.txt").write_text("the training loss became nan in epoch 1, batch 3\n")
    results.write_text(yaml.safe_dump({"name": "optuna", "best_params": {"optimizer.lr": 0.01}, "best_value": 0.8}))
    callback.on_multirun_end(cfg)  # the study found a best trial: a warning, exit code 0
    line = capsys.readouterr().err.strip()
    assert line.startswith("warning: 1 trial of the Optuna study failed and counted as the worst value: ")
    assert f"{sweep}/1/error.txt (the training loss became nan in epoch 1, batch 3)" in line and "\n" not in line

    callback.on_multirun_start(cfg)  # the same folder again: the results are now stale, so they do not count
    (sweep / "0" / "error.txt").write_text("model.layers must be at least 1, got 0\n")
    with pytest.raises(SystemExit) as exit_:
        callback.on_multirun_end(cfg)
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith("error: 1 job of the sweep failed: ")

    callback.on_multirun_start(cfg)  # every trial failed: the best value is the worst one
    (sweep / "1" / "error.txt").write_text("again\n")
    results.write_text(yaml.safe_dump({"name": "optuna", "best_params": {"optimizer.lr": 9.0}, "best_value": -math.inf}))
    with pytest.raises(SystemExit):
        callback.on_multirun_end(cfg)


def _fake_trial(path: Path, lr: float, value: float, status: str = "completed") -> None:
    """A job folder of an Optuna study on best_val_loss, as msnet train writes it."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"optimizer.lr={lr}", "threads=1"]))
    config = {"optimizer": {"lr": lr}, "trainer": {"objective": "best_val_loss"}, "seed": 0}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "summary.json").write_text(json.dumps({"status": status, "best_val_loss": value, "epochs": 1}))


def test_report_marks_the_best_trial_of_a_study(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_trial(sweep / "0", 0.01, 0.9)
    _fake_trial(sweep / "1", 0.1, 0.5)
    _fake_trial(sweep / "2", 0.1, 0.7)  # the sampler may ask for the same params twice: the value decides
    _fake_trial(sweep / "3", 1e38, math.inf, status="failed")
    (sweep / "4").mkdir()
    (sweep / "4" / "error.txt").write_text("model.layers must be at least 1, got 0\n")  # failed before training
    (sweep / "optimization_results.yaml").write_text(
        yaml.safe_dump({"name": "optuna", "best_params": {"optimizer.lr": 0.1}, "best_value": 0.5}))
    [study] = optuna_studies(sweep)
    assert study["best_run"] == sweep / "1" and study["objective"] == "best_val_loss"
    assert (study["trials"], study["failed"]) == (5, 2)
    columns, rows = report(sweep)
    assert columns[:2] == ["run", "optuna"] and "best_val_loss" in columns  # the objective is a column
    assert [r["optuna"] for r in rows] == [None, "best", None, None]
    assert (sweep / "report.md").read_text().splitlines()[-1] == (
        "optuna study .: best best_val_loss = 0.5000 at optimizer.lr=0.1 (run 1); 5 trials, 2 failed")


# --- real studies ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_study_finds_its_best_trial_and_report_shows_it(tmp_path):
    """The command of the docs, on a tiny synthetic problem: 5 TPE trials over a log-uniform learning rate."""
    proc = msnet("train", "-m", "hydra/sweeper=optuna", "optimizer.lr=tag(log, interval(1e-3, 1.0))",
                 "hydra.sweeper.n_trials=5", *TINY, "trainer.progress=false", "threads=1", "hydra.sweep.dir=study",
                 cwd=tmp_path)
    study = tmp_path / "study"
    results = yaml.safe_load((study / "optimization_results.yaml").read_text())
    trials = sorted(p for p in study.iterdir() if p.is_dir())
    summaries = [json.loads((t / "summary.json").read_text()) for t in trials]
    lrs = [yaml.safe_load((t / "config.yaml").read_text())["optimizer"]["lr"] for t in trials]
    assert len(trials) == 5 and len(set(lrs)) == 5 and all(1e-3 <= lr <= 1.0 for lr in lrs)
    assert all(s["status"] == "completed" for s in summaries)
    best = max(range(5), key=lambda i: summaries[i]["best_val_acc"])
    assert results["best_value"] == max(s["best_val_acc"] for s in summaries)
    assert results["best_params"] == {"optimizer.lr": lrs[best]}
    assert f"Best value: {results['best_value']}" in proc.stdout
    out = msnet("report", "study", cwd=tmp_path).stdout
    assert "optuna study .: best best_val_acc" in out and "5 trials, 0 failed" in out
    [marked] = [line for line in (study / "report.md").read_text().splitlines() if "| best |" in line]
    assert marked.startswith(f"| {trials[best].name} | best |")


@pytest.mark.slow
def test_a_diverging_trial_does_not_end_a_parallel_study(tmp_path):
    """Two trials at a time with the joblib launcher; the grid sampler tries every learning rate, and
    lr=1e38 diverges (NaN loss): that trial counts as the worst value and the study goes on."""
    proc = msnet("train", "-m", "hydra/sweeper=optuna", "hydra/launcher=joblib", "hydra.sweeper.n_jobs=2",
                 "hydra/sweeper/sampler=grid", "optimizer=sgd", "optimizer.lr=choice(0.03, 0.3, 1e38)", *TINY,
                 "trainer.progress=false", "threads=1", "hydra.sweep.dir=study", cwd=tmp_path)
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout
    study = tmp_path / "study"
    by_lr = {yaml.safe_load((t / "config.yaml").read_text())["optimizer"]["lr"]: t for t in study.iterdir() if t.is_dir()}
    assert sorted(by_lr) == [0.03, 0.3, 1e38]
    diverged = json.loads((by_lr[1e38] / "summary.json").read_text())
    assert diverged["status"] == "failed" and "the training loss became nan" in diverged["error"]
    assert "the training loss became nan" in (by_lr[1e38] / "error.txt").read_text()
    finished = {lr: json.loads((by_lr[lr] / "summary.json").read_text())["best_val_acc"] for lr in (0.03, 0.3)}
    results = yaml.safe_load((study / "optimization_results.yaml").read_text())
    assert results["best_value"] == max(finished.values())
    assert results["best_params"] == {"optimizer.lr": max(finished, key=finished.get)}
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("warning: 1 trial of the Optuna study failed and counted as the worst value: study/")
    out = msnet("report", "study", cwd=tmp_path).stdout
    assert "3 trials, 1 failed" in out


def test_a_study_storage_this_environment_cannot_open_is_one_line(hydra_cfg, monkeypatch):
    import importlib.metadata as metadata

    from msnet.commands import StudyStorageCheck, study_storage_problem

    real = metadata.version
    versions = {"optuna": "2.10.1", "sqlalchemy": "2.1.9"}
    monkeypatch.setattr(metadata, "version", lambda name: versions.get(name.lower()) or real(name))
    cfg = hydra_cfg(["hydra/sweeper=optuna", "hydra.sweeper.storage=sqlite:///study.db", "hydra.sweeper.study_name=lr"])
    line = study_storage_problem(cfg)
    assert line.startswith("hydra.sweeper.storage=sqlite:///study.db: Optuna 2.10.1 (the newest hydra-optuna-sweeper "
                           "allows) cannot open a database with SQLAlchemy 2.1.9")
    assert "drop hydra.sweeper.storage" in line and "\n" not in line
    with pytest.raises(SystemExit) as exit_:
        StudyStorageCheck().on_multirun_start(cfg)
    assert exit_.value.code == 2
    # what can be opened passes: an in-memory study, SQLAlchemy < 2 (or an Optuna that takes SQLAlchemy 2), no sweeper
    assert study_storage_problem(hydra_cfg(["hydra/sweeper=optuna"])) is None
    versions["sqlalchemy"] = "1.4.54"
    assert study_storage_problem(cfg) is None
    versions.update(optuna="4.5.0", sqlalchemy="2.1.9")
    assert study_storage_problem(cfg) is None
    assert study_storage_problem(hydra_cfg(["model.layers=2"])) is None


@pytest.mark.slow
def test_a_database_study_that_cannot_open_stops_before_any_trial(tmp_path):
    from msnet.commands import study_storage_problem

    args = ["train", "-m", "hydra/sweeper=optuna", "optimizer.lr=tag(log, interval(1e-4, 1e-1))",
            "hydra.sweeper.n_trials=2", "hydra.sweeper.storage=sqlite:///study.db", "hydra.sweeper.study_name=lr",
            "hydra.sweep.dir=study", *TINY]
    proc = msnet(*args, cwd=tmp_path, check=False)
    from omegaconf import OmegaConf

    expected = study_storage_problem(OmegaConf.create({"hydra": {"sweeper": {
        "_target_": OPTUNA, "storage": "sqlite:///study.db"}}}))
    if expected is None:  # an environment whose Optuna opens the database: the study runs
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {expected}"
    assert not (tmp_path / "study").exists() and not (tmp_path / "study.db").exists()

"""Sweeps: launcher presets (joblib, SLURM), a seed per job, failing jobs, and ``msnet report --group-by``."""

from __future__ import annotations

import csv
import json
import os
import pickle
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from msnet import MsnetError
from msnet.cli import rewrite
from msnet.commands import SweepFailures, errors_as_lines
from msnet.runs.report import GROUP_METRICS, group_report
from tests.test_cli import TINY, msnet

PNG = b"\x89PNG\r\n\x1a\n"
# the warning that msnet.commands silences for the CLI (each launcher preset replaces the plugin's config)
pytestmark = pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/\w+' is validated against ConfigStore schema")


def _need(module: str) -> None:
    """Fail, naming the fix, when a launcher plugin is missing (setup.sh installs them)."""
    try:
        __import__(module)
    except ImportError as err:
        pytest.fail(f"{module} is not installed ({err}); run ./scripts/setup.sh or pip install -e '.[sweep]'")


@pytest.fixture
def hydra_job():
    """``hydra_job(mode, num)``: the train config (seed 10), with HydraConfig set as in job ``num`` of a sweep."""
    from hydra import compose, initialize_config_module

    from msnet.config import register_configs

    def _set(mode: str = "MULTIRUN", num: int = 0):
        cfg = compose("train", [f"hydra.mode={mode}", "seed=10"], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.job.num = num
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    register_configs()
    with initialize_config_module(config_module="msnet.conf", version_base="1.3"):
        yield _set
    HydraConfig.instance().cfg = None


# --- launcher presets --------------------------------------------------------------------------


@pytest.mark.parametrize("launcher,target,values", [
    ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", {"n_jobs": 2}),
    ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
     {"partition": None, "timeout_min": 120, "gpus_per_node": 1, "cpus_per_task": 4, "mem_gb": 16,
      "array_parallelism": 32}),
])
def test_launcher_presets_compose(launcher, target, values):
    _need(target.rsplit(".", 2)[0])
    from hydra import compose, initialize_config_module

    from msnet.config import register_configs

    register_configs()
    with initialize_config_module(config_module="msnet.conf", version_base="1.3"):
        cfg = compose("train", [f"hydra/launcher={launcher}"], return_hydra_config=True)
    # msnet's preset replaces the plugin's config of the same name, and keeps its class
    assert cfg.hydra.launcher._target_ == target
    assert {k: cfg.hydra.launcher[k] for k in values} == values
    assert cfg.hydra.runtime.choices["hydra/launcher"] == launcher
    assert cfg.hydra.callbacks.sweep_failures._target_ == "msnet.commands.SweepFailures"


# --- seeds -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_job_of_a_sweep_trains_with_the_typed_seed(tmp_path):
    """``-m model.layers=2,4 seed=3``: both jobs seed 3, so they shuffle the same batches (the data-order
    generator in each checkpoint is the one seed 3 gives after one epoch's permutation), and each job's
    command.txt reproduces that job alone."""
    import torch

    msnet("train", "-m", "model.layers=2,4", "seed=3", *TINY, "hydra.sweep.dir=sweep", cwd=tmp_path)
    n_train = int(next(o for o in TINY if o.startswith("dataset.n_train=")).split("=")[1]) - 100  # val_size=100
    expected = torch.Generator().manual_seed(3)
    torch.randperm(n_train, generator=expected)  # the first epoch's batch order
    for job, layers in ((tmp_path / "sweep" / "0", 2), (tmp_path / "sweep" / "1", 4)):
        saved = yaml.safe_load((job / "config.yaml").read_text())
        assert (saved["seed"], saved["model"]["layers"]) == (3, layers)
        ckpt = torch.load(job / "checkpoints" / "last.pt", weights_only=True)
        assert torch.equal(ckpt["rng"]["data"], expected.get_state())
        assert (job / "command.txt").read_text().split() == ["msnet", "train", f"model.layers={layers}", "seed=3", *TINY]


# --- failing jobs ------------------------------------------------------------------------------


def test_a_failing_sweep_job_keeps_its_error_and_returns(hydra_job, tmp_path, capsys):
    hydra_job("MULTIRUN", 1)
    with errors_as_lines(tmp_path):
        raise MsnetError("model.layers must be at least 1, got 0")
    assert (tmp_path / "error.txt").read_text() == "model.layers must be at least 1, got 0\n"
    with errors_as_lines(tmp_path):
        raise RuntimeError("boom")  # a bug: the traceback is kept, the sweep goes on
    assert "Traceback" in (tmp_path / "error.txt").read_text()
    assert "RuntimeError: boom" in capsys.readouterr().err
    with errors_as_lines(tmp_path):
        pass  # a later run into the same directory that succeeds
    assert not (tmp_path / "error.txt").exists()
    hydra_job("RUN")
    with pytest.raises(RuntimeError):
        with errors_as_lines(tmp_path):
            raise RuntimeError("boom")  # outside a sweep nothing is swallowed


def test_an_error_under_torchrun_is_reported_by_rank_0_alone(hydra_job, tmp_path, monkeypatch, capsys):
    hydra_job("RUN")
    for rank, shown in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_:
            with errors_as_lines(tmp_path):
                raise MsnetError("dataset.val_size must be >= 0")
        assert exit_.value.code == 2
        assert ("error: dataset.val_size must be >= 0" in capsys.readouterr().err) == shown
        assert (tmp_path / "error.txt").exists() == shown


def test_sweep_failures_names_the_new_errors(tmp_path, capsys):
    from omegaconf import OmegaConf

    sweep = tmp_path / "sweep"
    for job in ("0", "1", "2", "10"):
        (sweep / job).mkdir(parents=True)
    (sweep / "2" / "error.txt").write_text("stale, from an earlier sweep into the same folder\n")
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    callback = SweepFailures()
    callback.on_multirun_start(cfg)
    callback.on_multirun_end(cfg)  # nothing failed: returns
    callback.on_multirun_start(cfg)
    (sweep / "10" / "error.txt").write_text("Traceback ...\nRuntimeError: boom\n")
    (sweep / "1" / "error.txt").write_text("model.layers must be at least 1, got 0\n")
    with pytest.raises(SystemExit) as exit_:
        callback.on_multirun_end(cfg)
    assert exit_.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: 2 jobs of the sweep failed: ") and "\n" not in line
    assert line.index(f"{sweep}/1/error.txt (model.layers must be at least 1, got 0)") < line.index(
        f"{sweep}/10/error.txt (RuntimeError: boom)")
    assert "2/error.txt" not in line and f"the other jobs' results are in {sweep}" in line


# --- report --group-by -------------------------------------------------------------------------


def _fake_run(path: Path, layers: int, optimizer: str, seed: int, status: str = "completed") -> dict:
    """A run folder as msnet train writes it (config.yaml, metrics.jsonl, summary.json), numbers from the seed."""
    path.mkdir(parents=True)
    config = {"seed": seed, "threads": 1, "model": {"layers": layers, "channels": 4},
              "optimizer": {"name": optimizer, "lr": 0.001}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    curve = [0.5 + 0.1 * epoch + 0.01 * layers + 0.003 * seed ** 2 for epoch in (1, 2, 3)]
    (path / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "val_acc": a, "train_loss": 1.0}) + "\n" for e, a in zip((1, 2, 3), curve)))
    summary = {"status": status, "epochs": 3, "final_val_acc": curve[-1], "final_test_acc": curve[-1] - 0.02 * seed,
               "final_test_loss": 0.5 + 0.1 * seed, "best_val_acc": max(curve),
               "best_checkpoint_test_acc": max(curve) - 0.01 * seed, "wall_time_s": 10.0 + seed + layers}
    (path / "summary.json").write_text(json.dumps(summary))
    return summary


def test_group_report_means_and_stds(tmp_path):
    root = tmp_path / "sweep"
    expected = {}
    job = 0
    for layers in (4, 2):
        for optimizer in ("sgd", "adam"):
            for seed in (0, 1, 2):
                summary = _fake_run(root / str(job), layers, optimizer, seed + job)
                expected.setdefault((layers, optimizer), []).append((summary, seed + job))
                job += 1
    _fake_run(root / str(job), 2, "adam", 99, status="failed")  # left out of the numbers, counted

    out = group_report(root, ["model.layers", "optimizer"])
    groups = out["groups"]
    assert [tuple(g["values"]) for g in groups] == [(2, "adam"), (2, "sgd"), (4, "adam"), (4, "sgd")]
    for g in groups:
        runs = expected[tuple(g["values"])]
        assert g["n"] == 3 and g["failed"] == (1 if tuple(g["values"]) == (2, "adam") else 0)
        for m in GROUP_METRICS:
            values = [s[m] for s, _ in runs]
            assert g["metrics"][m]["mean"] == pytest.approx(statistics.mean(values))
            assert g["metrics"][m]["std"] == pytest.approx(statistics.stdev(values))
        for epoch in (1, 2, 3):
            accs = [0.5 + 0.1 * epoch + 0.01 * g["values"][0] + 0.003 * seed ** 2 for _, seed in runs]
            assert g["curve"][epoch]["mean"] == pytest.approx(statistics.mean(accs))
            assert g["curve"][epoch]["std"] == pytest.approx(statistics.stdev(accs))

    with open(root / "report_groups.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model.layers"], r["optimizer"], r["n"], r["failed"]) for r in rows] == [
        ("2", "adam", "3", "1"), ("2", "sgd", "3", "0"), ("4", "adam", "3", "0"), ("4", "sgd", "3", "0")]
    first = groups[0]["metrics"]["final_test_acc"]
    assert float(rows[0]["final_test_acc_mean"]) == pytest.approx(first["mean"])
    assert float(rows[0]["final_test_acc_std"]) == pytest.approx(first["std"])
    md = (root / "report_groups.md").read_text().splitlines()
    assert md[0] == ("| model.layers | optimizer | n | failed | final val % | final test % | final test loss "
                     "| best val % | best.pt test % | time s |")
    assert md[2].startswith(f"| 2 | adam | 3 | 1 | {100 * groups[0]['metrics']['final_val_acc']['mean']:.2f} ± "
                            f"{100 * groups[0]['metrics']['final_val_acc']['std']:.2f} |")
    assert (root / "report_groups.png").read_bytes()[:8] == PNG
    assert out["plot_error"] is None


def test_group_report_errors_and_no_matplotlib(tmp_path, monkeypatch):
    for seed in (0, 1):
        _fake_run(tmp_path / str(seed), 2, "adam", seed)
    _fake_run(tmp_path / "2", 4, "adam", 0)
    with pytest.raises(MsnetError, match=r"cannot group by 'modle.layers'.*differ between the 3 runs: model.layers, seed"):
        group_report(tmp_path, ["modle.layers"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    out = group_report(tmp_path, ["model.layers"])
    assert "pip install 'msnet[plot]'" in out["plot_error"]
    assert (tmp_path / "report_groups.md").exists() and not (tmp_path / "report_groups.png").exists()
    single = [g for g in out["groups"] if g["values"] == [4]][0]
    assert single["n"] == 1 and single["metrics"]["final_val_acc"]["std"] is None
    assert [r["n"] for r in out["rows"]] == [2, 1]


def test_group_by_as_typed(compose_cfg):
    assert rewrite("report", ["sweep", "--group-by", "model.layers,optimizer"]) == [
        "dir='sweep'", "group_by=[model.layers,optimizer]"]
    assert rewrite("report", ["--group-by=model.layers", "sweep"]) == ["group_by=[model.layers]", "dir='sweep'"]
    assert rewrite("report", ["sweep", "group_by=model.layers"]) == ["dir='sweep'", "group_by=[model.layers]"]
    assert rewrite("report", ["sweep", "group_by=[a,b]"]) == ["dir='sweep'", "group_by=[a,b]"]
    cfg = compose_cfg("report", ["dir=sweep", "group_by=[model.layers,optimizer]"])
    assert list(cfg.group_by) == ["model.layers", "optimizer"]


# --- real sweeps -------------------------------------------------------------------------------


@pytest.mark.slow
def test_joblib_sweep_with_a_failing_job_then_report(tmp_path):
    """Two jobs at once: job 0 fails at its config check, job 1 finishes with the typed seed 5."""
    _need("hydra_plugins.hydra_joblib_launcher")
    proc = msnet("train", "-m", "hydra/launcher=joblib", "model.layers=0,2", "seed=5", "threads=1", *TINY,
                 "trainer.progress=false", "hydra.sweep.dir=sweep", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: 1 job of the sweep failed: sweep/0/error.txt (model.layers must be at least 1, got 0); "
        "the other jobs' results are in sweep")
    sweep = tmp_path / "sweep"
    assert (sweep / "0" / "error.txt").read_text() == "model.layers must be at least 1, got 0\n"
    assert json.loads((sweep / "1" / "summary.json").read_text())["status"] == "completed"
    cfg = yaml.safe_load((sweep / "1" / "config.yaml").read_text())
    assert (cfg["seed"], cfg["model"]["layers"]) == (5, 2)  # the seed typed
    assert yaml.safe_load((sweep / "1" / ".hydra" / "config.yaml").read_text())["seed"] == 5  # as typed
    out = msnet("report", "sweep", "--group-by", "model.layers", cwd=tmp_path).stdout
    assert "1 runs under sweep, 1 groups" in out and "report_groups.png" in out
    assert (sweep / "report_groups.png").read_bytes()[:8] == PNG
    with open(sweep / "report_groups.csv") as f:
        assert [(r["model.layers"], r["n"], r["final_val_acc_n"]) for r in csv.DictReader(f)] == [("2", "1", "1")]


@pytest.mark.slow
def test_slurm_submission_is_picklable_and_runs_where_submitit_runs_it(tmp_path):
    """What submitit hands to sbatch (the launcher, holding msnet's train function and the config),
    pickled as submitit pickles it, then unpickled and run by submitit's own job entry point in a
    fresh interpreter with SLURM's environment variables; only sbatch itself is left out."""
    _need("hydra_plugins.hydra_submitit_launcher")
    import submitit
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobStatus
    from hydra._internal.callbacks import Callbacks
    from hydra.types import HydraContext

    from msnet.commands.train import main

    job_overrides = [*TINY, "trainer.progress=false", "threads=1", "model.layers=1"]
    with initialize_config_module(config_module="msnet.conf", version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=submitit_slurm", "hydra.mode=MULTIRUN",
                                f"hydra.sweep.dir={tmp_path / 'sweep'}", *job_overrides], return_hydra_config=True)
        context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=Callbacks(cfg))
        launcher = Plugins.instance().instantiate_launcher(hydra_context=context, task_function=main.__wrapped__,
                                                           config=cfg)
        assert type(launcher).__name__ == "SlurmLauncher"
        folder = tmp_path / "sweep" / ".submitit" / "4242"
        folder.mkdir(parents=True)
        # as BaseSubmititLauncher.launch builds each job's arguments, and submitit pickles them
        submitit.helpers.DelayedSubmission(launcher, job_overrides, "hydra.sweep.dir", 1, "job_id_for_1",
                                           Singleton.get_state()).dump(folder / "4242_submitted.pkl")
    env = {**os.environ, "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1"}
    proc = subprocess.run([sys.executable, "-m", "submitit.core._submit", str(folder)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(folder / "4242_0_result.pkl", "rb") as f:
        outcome, job_return = pickle.load(f)
    assert outcome == "success" and job_return.status == JobStatus.COMPLETED
    run = tmp_path / "sweep" / "1"
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 0  # job 1 keeps the seed it was given

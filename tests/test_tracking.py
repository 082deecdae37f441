"""Trackers (``logger=tensorboard|mlflow|wandb``, or several: ``logger=[tensorboard,mlflow]``): what a run writes to
metrics.jsonl / steps.jsonl / summary.json is what TensorBoard's and MLflow's own readers find and what W&B's offline
run holds, for schedules, update rules with steps, resumes and sweeps."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
from omegaconf import OmegaConf

from msnet import MsnetError
from msnet.runs import read_metrics
from msnet.runs.tracking import TRACKERS, flatten_config, metric_name, scalars
from msnet.training import train
from msnet.training.setup import check_config
from tests.test_cli import TINY, msnet

ROOT = Path(__file__).resolve().parents[1]
EPOCH_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
GROUPED = {"train_loss": "train/loss", "train_acc": "train/acc", "val_loss": "val/loss", "val_acc": "val/acc",
           "lr": "lr"}  # metrics.jsonl key -> the trackers' name


@pytest.fixture(autouse=True)
def wandb_offline(tmp_path, monkeypatch):
    """W&B without a network, a login or files outside tmp_path: offline mode, its caches in tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))


def tracking_state(run: Path) -> Dict[str, Dict[str, Any]]:
    """``tracking.json``'s entries by tracker name."""
    return json.loads((run / "tracking.json").read_text())["trackers"]


def read_steps(run: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines() if line.strip()]


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def mlflow_run(run: Path):
    """The MLflow client and run that ``run``'s tracking.json names."""
    saved = tracking_state(run)["mlflow"]
    client = mlflow_client(saved["tracking_uri"])
    return client, client.get_run(saved["run_id"])


# --- records as numbers -------------------------------------------------------------------------


def test_scalars_and_flattened_config():
    record = {"epoch": 3, "level": "coarse", "resolution": [4, 6], "layers": [2], "val_acc": None,
              "train_loss": float("nan"), "ok": True, "lr": 0.5}
    assert scalars(record) == {"epoch": 3.0, "resolution_0": 4.0, "resolution_1": 6.0, "layers": 2.0, "ok": 1.0,
                               "lr": 0.5}
    flat = flatten_config({"model": {"layers": 4, "widths": None, "sd": {"p_last": 0.5}}, "pyramid": {"epochs": [2, 1]}})
    assert flat == {"model.layers": 4, "model.widths": "null", "model.sd.p_last": 0.5, "pyramid.epochs": "[2, 1]"}


def test_metrics_are_grouped_by_their_prefix():
    assert {k: metric_name(k) for k in GROUPED} == GROUPED
    assert metric_name("bcd_cg_iters") == "bcd/cg_iters" and metric_name("rmtr_radius") == "rmtr/radius"
    assert [metric_name(k) for k in ("epoch_time_s", "level_index", "resolution_0", "work_fge")] == [
        "epoch_time_s", "level_index", "resolution_0", "work_fge"]


# --- TensorBoard --------------------------------------------------------------------------------


def test_tensorboard_run_holds_every_epoch_the_hparams_and_the_figure(tiny_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    summary = train(tiny_cfg(["logger=tensorboard", "+pyramid=2level", "trainer.batch_size=100"]), tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert [r["level"] for r in rows] == ["coarse", "coarse", "fine"]
    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    ea.Reload()
    for key in EPOCH_KEYS:
        events = ea.Scalars(GROUPED[key])
        assert [e.step for e in events] == [r["epoch"] for r in rows], key
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6), key  # float32 events
    assert [e.value for e in ea.Scalars("resolution_0")] == [r["resolution"][0] for r in rows]
    assert [e.value for e in ea.Scalars("level_index")] == [0, 0, 1]
    assert ea.Scalars("summary/final_test_acc")[-1].value == pytest.approx(summary["final_test_acc"], rel=1e-6)
    start = plugin_data_pb2.HParamsPluginData.FromString(ea.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["model.layers"].number_value == 2 and hp["logger.tensorboard.flush_secs"].number_value == 10
    assert hp["logger.mlflow"].string_value == "null"
    assert hp["pyramid.epochs"].string_value == "[2, 1]"
    assert "figures/levels" in ea.Tags()["images"]


def test_tensorboard_resume_continues_the_same_folder(tmp_path, cut_and_resume):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cut_and_resume(["logger=tensorboard", "trainer.epochs=3"], 3)
    assert not (tmp_path / "resumed" / "tensorboard").exists()
    ea = EventAccumulator(str(tmp_path / "cut" / "tensorboard"))
    ea.Reload()
    rows = read_metrics(tmp_path / "resumed")
    assert [e.step for e in ea.Scalars("val/acc")] == [1, 2, 3] == [r["epoch"] for r in rows]
    assert [e.value for e in ea.Scalars("val/acc")] == pytest.approx([r["val_acc"] for r in rows], rel=1e-6)


# --- MLflow -------------------------------------------------------------------------------------


def test_mlflow_run_holds_metrics_steps_params_and_figures(tiny_cfg, tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    cfg = tiny_cfg(["logger=mlflow", f"logger.mlflow.tracking_uri={uri}", "logger.mlflow.experiment=tests",
                    "optimizer=bcd", "trainer.batch_size=200", "trainer.epochs=1", "model.integrator=lm"])
    summary = train(cfg, tmp_path / "run")
    client, run = mlflow_run(tmp_path / "run")
    assert run.info.status == "FINISHED" and client.get_experiment(run.info.experiment_id).name == "tests"
    assert run.info.run_name == f"{tmp_path.name}/run"  # short: the run dir's last two folders
    rows = read_metrics(tmp_path / "run")
    for key in EPOCH_KEYS + ("bcd_cg_iters",):
        history = client.get_metric_history(run.info.run_id, metric_name(key))
        assert [(m.step, m.value) for m in history] == [(r["epoch"], r[key]) for r in rows], key
    steps = read_steps(tmp_path / "run")
    assert len(steps) >= 2
    for key in ("loss_before", "damping", "cg_iters"):
        history = client.get_metric_history(run.info.run_id, f"step/{key}")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == [s[key] for s in steps], key
    params = run.data.params
    assert params["optimizer.name"] == "bcd" and params["model.layers"] == "2" and params["model.integrator"] == "lm"
    assert params["optimizer.cg_iters"] == str(cfg.optimizer.cg_iters) and params["pyramid"] == "null"
    assert params["dataset.num_classes"] == "4" and params["logger.mlflow.experiment"] == "tests"
    assert run.data.metrics["summary/final_test_acc"] == summary["final_test_acc"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "figures")] == ["figures/lm_k.png"]
    assert client.list_artifacts(run.info.run_id, "checkpoints") == []  # logger.log_checkpoint=false
    assert run.info.artifact_uri.startswith((tmp_path / "store" / "mlartifacts").as_uri())  # beside the store


def test_mlflow_resume_continues_the_same_run(tiny_cfg, tmp_path, fail_epoch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = ["logger=mlflow", f"logger.mlflow.tracking_uri={uri}", "trainer.epochs=3"]
    cut = fail_epoch(3)
    with pytest.raises(MsnetError, match="interrupted during epoch 3"):
        train(tiny_cfg(base), tmp_path / "cut")
    cut.restore()
    client, run = mlflow_run(tmp_path / "cut")
    assert run.info.status == "KILLED"
    ck = tmp_path / "cut" / "checkpoints" / "last.pt"
    train(tiny_cfg(base + [f"resume={ck}"]), tmp_path / "resumed", overrides=[f"resume={ck}"])
    again = mlflow_run(tmp_path / "resumed")[1]
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    rows = read_metrics(tmp_path / "resumed")
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], r["val_acc"]) for r in rows]


@pytest.mark.slow
def test_a_two_job_sweep_gives_two_runs_in_one_experiment(tmp_path):
    # joblib: the two jobs open the new default store at the same time (without the store lock one failed with
    # "duplicate column name", both creating its tables)
    msnet("train", "-m", "hydra/launcher=joblib", "logger=mlflow", "model.layers=1,2", "threads=1", *TINY, cwd=tmp_path)
    client = mlflow_client(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")  # the default store
    runs = client.search_runs([client.get_experiment_by_name("msnet").experiment_id])
    assert sorted(r.data.params["model.layers"] for r in runs) == ["1", "2"]
    assert len({r.data.tags["msnet.sweep"] for r in runs}) == 1
    assert all(f"model.layers={r.data.params['model.layers']}" in r.data.tags["msnet.overrides"] for r in runs)
    assert all(r.info.run_name == "/".join(Path(r.data.tags["msnet.run_dir"]).parts[-2:]) for r in runs)  # TIME/JOB
    jobs = sorted(Path(r.data.tags["msnet.run_dir"]) for r in runs)
    for job, run in zip(jobs, sorted(runs, key=lambda r: r.data.tags["msnet.run_dir"])):
        history = client.get_metric_history(run.info.run_id, "val/acc")
        assert [m.value for m in history] == [r["val_acc"] for r in read_metrics(job)]


# --- failures and ranks -------------------------------------------------------------------------


@pytest.mark.parametrize("logger,module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_missing_backend_is_one_line_naming_the_extra(tiny_cfg, tmp_path, monkeypatch, logger, module):
    real = builtins.__import__

    def without(name, *args, **kwargs):
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named {module!r}")
        return real(name, *args, **kwargs)

    cfg = tiny_cfg([f"logger={logger}"])
    monkeypatch.setattr(builtins, "__import__", without)
    with pytest.raises(MsnetError) as err:
        check_config(cfg)
    assert f"pip install 'msnet[{logger}]'" in str(err.value) and "\n" not in str(err.value)

    import msnet.training.api as api

    monkeypatch.setattr(api, "prepare_data", lambda *a, **k: pytest.fail("data loaded before the logger check"))
    with pytest.raises(MsnetError, match=rf"logger={logger} needs"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_unreachable_mlflow_server_is_one_line_in_seconds(tiny_cfg, tmp_path):
    import time

    cfg = tiny_cfg(["logger=mlflow", "logger.mlflow.tracking_uri=http://127.0.0.1:9"])  # port 9: nothing listens
    t0 = time.perf_counter()
    with pytest.raises(MsnetError, match="logger=mlflow could not open the tracking store http://127.0.0.1:9") as err:
        train(cfg, tmp_path / "run")
    assert "check logger.mlflow.tracking_uri" in str(err.value) and "\n" not in str(err.value)
    assert time.perf_counter() - t0 < 60  # MLflow alone retries for about four minutes
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_tensorboard_log_dir_gives_each_sweep_job_a_subfolder(tiny_cfg, tmp_path):
    from msnet.runs.tracking import open_trackers

    cfg = tiny_cfg(["logger=tensorboard", f"logger.tensorboard.log_dir={tmp_path / 'tb'}"])
    trackers = [open_trackers(cfg, tmp_path / "sweep" / str(job), group=str(tmp_path / "sweep"))[0] for job in (0, 1)]
    assert [t.log_dir for t in trackers] == [tmp_path / "tb" / "0", tmp_path / "tb" / "1"]
    (single,) = open_trackers(cfg, tmp_path / "single")
    assert single.log_dir == tmp_path / "tb"
    for t in trackers + [single]:
        t.close()


def test_only_rank_0_opens_a_tracker(tiny_cfg, tmp_path):
    from msnet.training.api import _open_run
    from msnet.training.distributed import DistEnv

    cfg = tiny_cfg(["logger=tensorboard"])
    other = _open_run(cfg, tmp_path / "rank1", None, DistEnv(rank=1, world_size=2))
    assert other.trackers == [] and not other.tracked
    other.close()
    assert not (tmp_path / "rank1" / "tracking.json").exists() and not (tmp_path / "rank1" / "tensorboard").exists()
    main = _open_run(cfg, tmp_path / "rank0", None, DistEnv(rank=0, world_size=2))
    main.close()
    assert list(tracking_state(tmp_path / "rank0")) == ["tensorboard"]


def test_logger_none_writes_no_tracking_file_and_old_configs_read_as_none(tiny_cfg, tmp_path):
    from msnet.runs.tracking import chosen, logger_config

    cfg = tiny_cfg(["trainer.epochs=1"])
    assert all(cfg.logger[name] is None for name in TRACKERS) and cfg.logger.log_checkpoint is False
    train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "tracking.json").exists()
    old = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg).items() if k != "logger"})
    check_config(old)
    assert chosen(logger_config(old)) == []
    saved = OmegaConf.create({"logger": {"name": "none"}})  # logger=none before the registry
    assert chosen(logger_config(saved)) == []


def test_an_old_checkpoints_logger_reads_as_todays_form(tmp_path):
    # before the registry a config held one tracker as logger.name with its keys beside it; a resume overriding a
    # key of the new form (logger.mlflow.experiment=new) adds it beside them, after load_checkpoint's upgrade
    from omegaconf import open_dict

    from msnet.config import upgrade_config
    from msnet.runs.tracking import chosen, logger_config, saved_states

    old = {"logger": {"name": "mlflow", "tracking_uri": "sqlite:///x.db", "experiment": "old", "run_name": None}}
    for saved in (OmegaConf.create(old), OmegaConf.create(upgrade_config(old))):  # as saved, as load_checkpoint has it
        with open_dict(saved):  # what resumed_config does with the override
            OmegaConf.update(saved, "logger.mlflow.experiment", "new", merge=False, force_add=True)
        lg = logger_config(saved)
        assert [n for n, _ in chosen(lg)] == ["mlflow"] and lg.mlflow.tracking_uri == "sqlite:///x.db"
        assert lg.mlflow.experiment == "new" and lg.log_checkpoint is False and lg.tensorboard is None
    tb = logger_config(OmegaConf.create({"logger": {"name": "tensorboard", "log_dir": None, "flush_secs": 3}}))
    assert tb.tensorboard.flush_secs == 3 and tb.mlflow is None
    (tmp_path / "tracking.json").write_text(json.dumps({"logger": "tensorboard", "log_dir": "/tb", "steps": 4}))
    assert saved_states(tmp_path) == {"tensorboard": {"logger": "tensorboard", "log_dir": "/tb", "steps": 4}}


def test_an_unknown_tracker_is_one_line_listing_the_choices(compose_cfg):
    from hydra.errors import MissingConfigException

    from msnet.commands import type_error_line, unselected_group_line

    base = OmegaConf.to_container(compose_cfg("train", ["dataset=synthetic"]))
    for saved in ({"name": "neptune"}, {"neptune": {}}):  # a saved config's logger.name, a key no schema has
        with pytest.raises(MsnetError) as err:
            check_config(OmegaConf.create({**base, "logger": saved}))
        assert str(err.value) == "unknown logger 'neptune'; choose one of: mlflow, tensorboard, wandb"
    for typed in ("logger=neptune", "logger=[tensorboard,neptune]"):  # Hydra lists no options for a list entry
        with pytest.raises(MissingConfigException) as err:
            compose_cfg("train", [typed])
        assert type_error_line(err.value) == ("logger=neptune: the group logger has no option 'neptune'; "
                                              "choose one of mlflow, none, tensorboard, wandb")
    typed = ["trainer.epochs=1", "logger=tensorboard", "logger.mlflow.experiment=x"]
    with pytest.raises(AssertionError) as err:  # a tracker's key without choosing the tracker
        compose_cfg("train", typed)
    assert unselected_group_line(err.value, typed) == (
        "logger.mlflow.experiment=x: logger.mlflow is off, so its keys cannot be set; select it first, "
        "e.g. logger=mlflow logger.mlflow.experiment=x")
    typed = ["logger=[tensorboard,mlflow]", "logger.mlflow.experiment=x"]
    assert compose_cfg("train", typed).logger.mlflow.experiment == "x"


@pytest.mark.parametrize("logger,has", [([], "no tracker is chosen"), (["logger=tensorboard"],
                                                                         "logger=tensorboard stores no files")])
def test_log_checkpoint_without_an_artifact_store_is_one_line(tiny_cfg, logger, has):
    with pytest.raises(MsnetError) as err:
        check_config(tiny_cfg([*logger, "logger.log_checkpoint=true"]))
    assert str(err.value) == (f"logger.log_checkpoint=true sends the checkpoints to MLflow or W&B, but {has}; add "
                              "logger=mlflow or logger=wandb (several: logger=[tensorboard,mlflow]), or drop it")
    check_config(tiny_cfg(["logger=[tensorboard,wandb]", "logger.log_checkpoint=true"]))


@pytest.mark.parametrize("logger,cls", [("tensorboard", "TensorBoardTracker"), ("mlflow", "MLflowTracker"),
                                        ("wandb", "WandbTracker")])
def test_a_tracker_failing_mid_run_is_one_warning_and_the_run_finishes(tiny_cfg, tmp_path, monkeypatch, logger, cls):
    # a server that goes away or a full disk in epoch 2 of 3: one warning line, the tracker gets nothing more,
    # and the run's own files (metrics, summary, checkpoint, console) are whole
    import msnet.runs.tracking as tracking

    tracker_cls = getattr(tracking, cls)
    calls: Dict[str, int] = {}
    real_metrics = tracker_cls.log_metrics

    def counted(name, real=None):
        def method(self, *args):
            calls[name] = calls.get(name, 0) + 1
            if name == "log_metrics" and calls[name] == 2:
                raise OSError("No space left on device\nsecond line")
            return real(self, *args) if real else None
        return method

    monkeypatch.setattr(tracker_cls, "log_metrics", counted("log_metrics", real_metrics))
    for name in ("log_summary", "log_figure"):
        monkeypatch.setattr(tracker_cls, name, counted(name))
    store = [f"logger.mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"] if logger == "mlflow" else []
    summary = train(tiny_cfg([f"logger={logger}", "trainer.epochs=3", *store]), tmp_path / "run")

    assert summary["status"] == "completed" and summary["epochs"] == 3
    assert calls == {"log_metrics": 2}  # nothing after the failure: no third epoch, no summary, no figures
    assert [r["epoch"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
    expected = f"logger={logger} failed in log_metrics (OSError: No space left on device); msnet sends it nothing more"
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["tracker_error"].startswith(expected) and "logger=none" in on_disk["tracker_error"]
    assert "\n" not in on_disk["tracker_error"]
    console = (tmp_path / "run" / "console.txt").read_text()
    assert console.count("warning: logger=") == 1 and f"warning: {expected}" in console  # one line, as printed
    assert f"{logger} failed in log_metrics (OSError: No space left on device)" in console.split("summary")[-1]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert list(tracking_state(tmp_path / "run")) == [logger]


def test_a_tracker_failing_at_its_end_leaves_the_run_and_says_so_in_the_summary(tiny_cfg, tmp_path, monkeypatch):
    import msnet.runs.tracking as tracking

    def broken(self):
        raise ConnectionError("server closed the connection")

    monkeypatch.setattr(tracking.TensorBoardTracker, "close", broken)
    summary = train(tiny_cfg(["logger=tensorboard", "trainer.epochs=1"]), tmp_path / "run")
    assert summary["status"] == "completed"
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["tracker_error"].startswith("logger=tensorboard failed in close (ConnectionError: server closed")
    assert on_disk["final_test_acc"] == summary["final_test_acc"]


def test_the_ranks_of_a_sweep_job_find_their_sweep_folder(tmp_path, monkeypatch):
    from msnet.commands.train import sweep_group_for_ranks
    from msnet.runs.tracking import SWEEP_GROUP_ENV, job_identity

    monkeypatch.delenv(SWEEP_GROUP_ENV, raising=False)
    short = f"{tmp_path.name}/run"  # the run dir's last two folders
    assert job_identity(tmp_path / "run") == {"name": short, "group": None, "overrides": None}
    with sweep_group_for_ranks(str(tmp_path / "sweep")):  # what msnet train sets around torchrun in a sweep
        assert job_identity(tmp_path / "run") == {"name": short, "group": str(tmp_path / "sweep"), "overrides": None}
    assert SWEEP_GROUP_ENV not in __import__("os").environ
    with sweep_group_for_ranks(None):  # a single run: nothing set
        assert job_identity(tmp_path / "run")["group"] is None


@pytest.mark.slow
def test_a_data_parallel_sweep_job_is_tagged_with_its_sweep(tmp_path):
    msnet("train", "-m", "trainer.devices=2", "logger=mlflow", "model.layers=1", "threads=1", "trainer.progress=false",
          *TINY, "hydra.sweep.dir=sweep", cwd=tmp_path)
    client = mlflow_client(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("msnet").experiment_id])
    assert run.data.tags["msnet.sweep"] == str((tmp_path / "sweep").resolve())
    assert run.data.tags["msnet.run_dir"] == str((tmp_path / "sweep" / "0").resolve())
    assert "model.layers=1" in run.data.tags["msnet.overrides"] and run.info.run_name == "sweep/0"


# --- W&B, several trackers at once, the registry ----------------------------------------------------


@pytest.fixture
def wandb_logs(monkeypatch) -> List[Dict[str, Any]]:
    """Every dict msnet hands to a W&B run's ``log`` (a spy around the real method, which still writes the run)."""
    from wandb.sdk.wandb_run import Run

    calls: List[Dict[str, Any]] = []
    real = Run.log

    def spy(self, data, *args, **kwargs):
        calls.append(dict(data))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Run, "log", spy)
    return calls


def test_wandb_offline_run_holds_every_epoch_step_and_the_summary(tiny_cfg, tmp_path, wandb_logs):
    cfg = tiny_cfg(["logger=wandb", "logger.wandb.tags=[tiny,test]", "optimizer=bcd", "trainer.batch_size=200",
                    "trainer.epochs=2", "logger.log_checkpoint=true"])
    summary = train(cfg, tmp_path / "run")
    rows, steps = read_metrics(tmp_path / "run"), read_steps(tmp_path / "run")
    epochs = [c for c in wandb_logs if "epoch" in c]
    assert [c["epoch"] for c in epochs] == [r["epoch"] for r in rows]
    for call, row in zip(epochs, rows):
        assert {GROUPED[k]: call[GROUPED[k]] for k in EPOCH_KEYS} == {GROUPED[k]: row[k] for k in EPOCH_KEYS}
        assert call["bcd/cg_iters"] == row["bcd_cg_iters"] and call["level_index"] == 0
    logged_steps = [c for c in wandb_logs if "step" in c]
    assert [c["step"] for c in logged_steps] == list(range(1, len(steps) + 1)) and len(steps) >= 2
    assert [c["step/damping"] for c in logged_steps] == [s["damping"] for s in steps]

    state = tracking_state(tmp_path / "run")["wandb"]
    assert state["mode"] == "offline" and state["steps"] == len(steps)
    (folder,) = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{state['run_id']}")  # under the run dir
    history = (folder / f"run-{state['run_id']}.wandb").read_bytes()  # W&B's own record of the run
    for key in ("train/loss", "val/acc", "step/damping", "summary/final_test_acc", "tiny", "checkpoints-"):
        assert key.encode() in history, key
    assert summary["status"] == "completed"


def test_several_trackers_at_once_each_get_every_record(tiny_cfg, tmp_path, wandb_logs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_cfg(["logger=[tensorboard,mlflow,wandb]", f"logger.mlflow.tracking_uri={uri}",
                    "logger.log_checkpoint=true"])
    assert cfg.logger.tensorboard.flush_secs == 10 and cfg.logger.wandb.mode.value == "offline"
    train(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert sorted(tracking_state(tmp_path / "run")) == ["mlflow", "tensorboard", "wandb"]
    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    ea.Reload()
    client, run = mlflow_run(tmp_path / "run")
    for key in EPOCH_KEYS:
        expected = [(r["epoch"], r[key]) for r in rows]
        events = ea.Scalars(GROUPED[key])
        assert [e.step for e in events] == [r["epoch"] for r in rows], key
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6), key  # float32 events
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, GROUPED[key])] == expected, key
        assert [(c["epoch"], c[GROUPED[key]]) for c in wandb_logs if "epoch" in c] == expected, key
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")) == [
        "checkpoints/best.pt", "checkpoints/last.pt"]
    assert run.info.status == "FINISHED" and run.data.params["logger.wandb.mode"] == "offline"


def test_one_tracker_failing_leaves_the_others_going(tiny_cfg, tmp_path, monkeypatch, wandb_logs):
    import msnet.runs.tracking as tracking

    def broken(self, record):
        raise OSError("No space left on device")

    monkeypatch.setattr(tracking.TensorBoardTracker, "log_metrics", broken)
    summary = train(tiny_cfg(["logger=[tensorboard,wandb]", "trainer.epochs=3"]), tmp_path / "run")
    assert summary["status"] == "completed"
    assert [c["epoch"] for c in wandb_logs if "epoch" in c] == [1, 2, 3]  # W&B got every epoch
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["tracker_error"].startswith("logger=tensorboard failed in log_metrics (OSError: No space left")
    assert "wandb" not in on_disk["tracker_error"] and "\n" not in on_disk["tracker_error"]
    assert sorted(tracking_state(tmp_path / "run")) == ["tensorboard", "wandb"]


def test_trackers_get_the_datasets_real_class_count(tmp_path):
    # dataset.num_classes is the synthetic generator's setting (default 4) and is in every composed config; the
    # trackers get the loaded data's count instead (Fashion-MNIST: 10), config.yaml keeps the config as composed
    from types import SimpleNamespace

    from msnet.config import compose_config
    from msnet.runs import RunDir

    class Spy:
        name, hint, resumed = "spy", "", False

        def log_config(self, config):
            self.config = config

    cfg = compose_config(["experiment=fashion_quick"])
    assert cfg.dataset.name == "fashion_mnist" and cfg.dataset.num_classes == 4
    spy = Spy()
    fashion = SimpleNamespace(num_classes=10, in_channels=1, image_size=(28, 28))
    RunDir(tmp_path / "run", trackers=[spy]).write_config(cfg, fashion)
    assert spy.config["dataset"]["num_classes"] == 10 and spy.config["dataset"]["image_size"] == 28
    assert flatten_config(spy.config)["dataset.channels"] == 1 and spy.config["model"]["channels"] == 8
    assert "num_classes: 4" in (tmp_path / "run" / "config.yaml").read_text()


@pytest.mark.parametrize("name", TRACKERS.names())
def test_every_tracker_declares_its_needs_and_is_installed_by_setup(name):
    cls = TRACKERS.get(name)
    assert cls.name == name and cls.modules and cls.install() == f"pip install 'msnet[{cls.extra}]'"
    assert f'\n{cls.extra} = ["' in (ROOT / "pyproject.toml").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert f", {cls.modules[0]}" in setup and f",{cls.extra}" in setup.split("pip install -q -e")[1].splitlines()[0]
    assert (ROOT / "conf" / "logger" / f"{name}.yaml").is_file()


def test_no_trackers_library_is_imported_with_msnet():
    code = ("import sys, msnet, msnet.runs, msnet.runs.tracking, msnet.training.api; "
            "print(sorted(m for m in ('wandb', 'mlflow', 'tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"

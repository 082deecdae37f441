"""Experiment trackers: whatever a run writes into its run directory also goes to TensorBoard or MLflow.

:class:`~msnet.runs.rundir.RunDir` is the one writer of a run's records, and it fans each one out to
its :class:`Tracker` (``logger=none|tensorboard|mlflow``, chosen in one place, :func:`open_tracker`):

- each ``metrics.jsonl`` row (:meth:`Tracker.log_metrics`): its numbers as scalars at step = ``epoch``
  (lists such as ``layers`` become ``layers`` for one entry, ``resolution_0``/``resolution_1`` for more;
  the level's name becomes ``level_index``, 0 for the first level seen);
- each ``steps.jsonl`` row (:meth:`Tracker.log_step`): an update rule's per-iteration diagnostics (BCD,
  MG/OPT, RMTR), as ``steps/<key>`` at a counter that runs on over the whole run;
- the resolved config, flattened to ``a.b.c`` keys (:meth:`Tracker.log_config`), and ``summary.json``'s
  numbers (:meth:`Tracker.log_summary`): TensorBoard hparams with the final metrics, MLflow params and
  metrics;
- the run's figures (:meth:`Tracker.log_figure`, :mod:`msnet.runs.plots`).

A resumed run continues the same tracked run where it can: ``tracking.json`` in the run directory
records the MLflow run id / TensorBoard folder and the step counter, and a resume from
``<old run>/checkpoints/last.pt`` reads the old run's file. Only rank 0 of a DDP run opens a tracker.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, List, Optional, Protocol

from omegaconf import DictConfig, OmegaConf

from msnet import MsnetError

TRACKING_FILE = "tracking.json"
LOGGERS = ("tensorboard", "mlflow")  # besides none; each is also the name of the msnet extra that installs it
SWEEP_GROUP_ENV = "MSNET_SWEEP_GROUP"
"""Set by ``msnet train`` for the torchrun ranks of a sweep job (``trainer.devices=K``): the sweep folder the job
belongs to, which the ranks, started as single runs, cannot read from Hydra."""


class Tracker(Protocol):
    """What a run directory fans its records out to (see the module docstring for what each receives)."""

    name: str
    resumed: bool  # continues a tracked run (a resume): the run's earlier rows are there already

    def state(self) -> Optional[Dict[str, Any]]: ...

    def log_config(self, config: Dict[str, Any]) -> None: ...

    def log_metrics(self, record: Dict[str, Any]) -> None: ...

    def log_step(self, record: Dict[str, Any]) -> None: ...

    def log_summary(self, summary: Dict[str, Any]) -> None: ...

    def log_figure(self, name: str, figure: Any) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    """``logger=none``: the run directory alone holds the run's records."""

    name = "none"
    resumed = False

    def state(self) -> Optional[Dict[str, Any]]:
        """Nothing to keep for a resume."""
        return None

    def log_config(self, config: Dict[str, Any]) -> None:
        """Nothing to do."""

    def log_metrics(self, record: Dict[str, Any]) -> None:
        """Nothing to do."""

    def log_step(self, record: Dict[str, Any]) -> None:
        """Nothing to do."""

    def log_summary(self, summary: Dict[str, Any]) -> None:
        """Nothing to do."""

    def log_figure(self, name: str, figure: Any) -> None:
        """Nothing to do."""

    def close(self) -> None:
        """Nothing to do."""


# --- records as numbers ---------------------------------------------------------------------------


def flatten_config(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """The nested config as ``{"model.layers": 4, ...}``: lists as their text (``"[2, 1]"``), None as ``"null"``."""
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, name + "."))
        elif value is None:
            flat[name] = "null"
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value if isinstance(value, (bool, int, float)) else str(value)
    return flat


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def scalars(record: Dict[str, Any], skip: Iterable[str] = ()) -> Dict[str, float]:
    """The finite numbers of one record, by name: a list of one number keeps the key, a longer list gives
    ``key_0, key_1, ...``; strings, None, NaN and nested dicts are left out."""
    out: Dict[str, float] = {}
    for key, value in record.items():
        if key in skip:
            continue
        if isinstance(value, (list, tuple)):
            items = [(key if len(value) == 1 else f"{key}_{i}", _number(v)) for i, v in enumerate(value)]
        else:
            items = [(key, _number(value))]
        out.update({k: v for k, v in items if v is not None})
    return out


class _Counters:
    """The bookkeeping every real tracker shares: level names -> indices, and the running step counter."""

    def __init__(self, saved: Optional[Dict[str, Any]]):
        self.levels: List[str] = list((saved or {}).get("levels", []))
        self.steps = int((saved or {}).get("steps", 0))

    def epoch_scalars(self, record: Dict[str, Any]) -> Dict[str, float]:
        values = scalars(record, skip=("epoch",))
        if isinstance(record.get("level"), str):
            if record["level"] not in self.levels:
                self.levels.append(record["level"])
            values["level_index"] = float(self.levels.index(record["level"]))
        return values

    def next_step(self) -> int:
        self.steps += 1
        return self.steps

    def to_dict(self) -> Dict[str, Any]:
        return {"levels": self.levels, "steps": self.steps}


# --- TensorBoard ----------------------------------------------------------------------------------


class TensorBoardTracker:
    """``logger=tensorboard``: one event-file folder per run (torch's ``SummaryWriter``).

    Epoch rows are scalars under their own names at step = epoch; step rows are ``steps/<key>``;
    the config and the final metrics are one hparams entry (``hparams/<key>`` scalars, the HPARAMS tab).
    A resumed run writes into the same folder, its steps continuing where they were.
    """

    name = "tensorboard"

    def __init__(self, log_dir: Path, flush_secs: int, saved: Optional[Dict[str, Any]] = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(saved["log_dir"]) if saved and saved.get("log_dir") else log_dir
        self.counters = _Counters(saved)
        self.resumed = saved is not None
        self.writer = SummaryWriter(str(self.log_dir), flush_secs=int(flush_secs))
        self.config: Dict[str, Any] = {}
        self.epoch = 0

    def state(self) -> Dict[str, Any]:
        """What ``tracking.json`` keeps for a resume."""
        return {"logger": self.name, "log_dir": str(self.log_dir), **self.counters.to_dict()}

    def log_config(self, config: Dict[str, Any]) -> None:
        """Kept until the summary: TensorBoard shows hparams beside the final metrics."""
        self.config = flatten_config(config)

    def log_metrics(self, record: Dict[str, Any]) -> None:
        """Each number of the row at step = the row's epoch."""
        self.epoch = int(record.get("epoch", self.epoch))
        for key, value in self.counters.epoch_scalars(record).items():
            self.writer.add_scalar(key, value, self.epoch)

    def log_step(self, record: Dict[str, Any]) -> None:
        """Each number of the row as ``steps/<key>`` at the next step."""
        step = self.counters.next_step()
        for key, value in scalars(record).items():
            self.writer.add_scalar(f"steps/{key}", value, step)

    def log_summary(self, summary: Dict[str, Any]) -> None:
        """The config as hparams, with the summary's numbers as ``hparams/<key>`` metrics."""
        from torch.utils.tensorboard.summary import hparams

        final = {f"hparams/{k}": v for k, v in scalars(summary, skip=("levels", "data_sizes")).items()}
        exp, ssi, sei = hparams(self.config, final)
        for event in (exp, ssi, sei):
            self.writer.file_writer.add_summary(event)
        for key, value in final.items():
            self.writer.add_scalar(key, value, self.epoch)
        self.writer.flush()

    def log_figure(self, name: str, figure: Any) -> None:
        """The matplotlib figure as an image at the last epoch (closes it)."""
        self.writer.add_figure(f"figures/{name}", figure, self.epoch, close=True)

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


# --- MLflow ---------------------------------------------------------------------------------------


def mlflow_default_uri(root: Path) -> str:
    """The local store inside the outputs folder ``root``: ``sqlite:///<abs root>/mlflow.db``."""
    return f"sqlite:///{root.resolve() / 'mlflow.db'}"


class MLflowTracker:
    """``logger=mlflow``: one MLflow run (per sweep job) in experiment ``logger.experiment``.

    Epoch rows are metrics at step = epoch; step rows are ``steps/<key>`` metrics; the flattened
    config is the run's params; the summary's numbers are ``final/<key>`` metrics; figures are
    artifacts under ``figures/``. A resumed run reopens the same MLflow run (its id in ``tracking.json``).
    """

    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_name: str, tags: Dict[str, str], artifacts: Optional[Path],
                 saved: Optional[Dict[str, Any]] = None):
        from mlflow.tracking import MlflowClient

        self.client, self.uri = MlflowClient(tracking_uri=uri), uri
        self.counters = _Counters(saved)
        self.resumed = bool(saved and saved.get("run_id") and saved.get("tracking_uri") == uri)
        if self.resumed:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            exp_id = self._experiment(experiment, artifacts)
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        self.epoch = 0
        self.status = "FAILED"  # until a summary says otherwise

    def _experiment(self, name: str, artifacts: Optional[Path]) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            location = (artifacts / name).resolve().as_uri() if artifacts is not None else None
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # another job of the sweep created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def state(self) -> Dict[str, Any]:
        """What ``tracking.json`` keeps for a resume."""
        return {"logger": self.name, "tracking_uri": self.uri, "run_id": self.run_id, **self.counters.to_dict()}

    def _metrics(self, values: Dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_config(self, config: Dict[str, Any]) -> None:
        """The flattened config as params (a resumed run adds only keys it did not have; changed values
        of overridden keys go into the tag ``msnet.resume_overrides``)."""
        from mlflow.entities import Param

        flat = {k: str(v)[:6000] for k, v in flatten_config(config).items()}
        if self.resumed:
            have = self.client.get_run(self.run_id).data.params
            changed = {k: v for k, v in flat.items() if k in have and have[k] != v}
            if changed:
                self.client.set_tag(self.run_id, "msnet.resume_overrides", json.dumps(changed)[:5000])
            flat = {k: v for k, v in flat.items() if k not in have}
        params = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_metrics(self, record: Dict[str, Any]) -> None:
        """Each number of the row at step = the row's epoch."""
        self.epoch = int(record.get("epoch", self.epoch))
        self._metrics(self.counters.epoch_scalars(record), self.epoch)

    def log_step(self, record: Dict[str, Any]) -> None:
        """Each number of the row as ``steps/<key>`` at the next step."""
        step = self.counters.next_step()
        self._metrics({f"steps/{k}": v for k, v in scalars(record).items()}, step)

    def log_summary(self, summary: Dict[str, Any]) -> None:
        """The summary's numbers as ``final/<key>`` metrics, its status as the run's status."""
        self._metrics({f"final/{k}": v for k, v in scalars(summary, skip=("levels", "data_sizes")).items()},
                      self.epoch)
        self.client.set_tag(self.run_id, "msnet.status", str(summary.get("status")))
        self.status = {"completed": "FINISHED", "interrupted": "KILLED"}.get(summary.get("status"), "FAILED")

    def log_figure(self, name: str, figure: Any) -> None:
        """The matplotlib figure as ``figures/<name>.png`` (closes it)."""
        import matplotlib.pyplot as plt

        self.client.log_figure(self.run_id, figure, f"figures/{name}.png")
        plt.close(figure)

    def close(self) -> None:
        """End the MLflow run with the summary's status (FAILED when the run ended without one)."""
        self.client.set_terminated(self.run_id, status=self.status)


# --- choosing one ---------------------------------------------------------------------------------


def logger_config(cfg: DictConfig) -> DictConfig:
    """``cfg.logger``, or ``logger=none`` for a config saved before loggers existed."""
    found = OmegaConf.select(cfg, "logger", default=None)
    return found if found is not None else OmegaConf.create({"name": "none"})


def check_backend(cfg: DictConfig) -> None:
    """Fail in one line, naming the extra to install, when the chosen logger's library is not importable.

    Called by the preflight (:func:`msnet.training.setup.check_config`), before data is loaded.
    """
    name = str(logger_config(cfg).name)
    if name == "none":
        return
    if name not in LOGGERS:
        raise MsnetError(f"unknown logger {name!r}; choose logger=none, logger=tensorboard or logger=mlflow")
    try:
        if name == "tensorboard":
            import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        else:
            import mlflow  # noqa: F401
    except ImportError as err:
        raise MsnetError(f"logger={name} needs the {name} package ({err}); install it with: "
                         f"pip install 'msnet[{name}]'") from None


def job_identity(run_path: Path) -> Dict[str, Optional[str]]:
    """The tracked run's name and group: in a ``-m`` sweep job, its overrides (``k=v,k=v``, Hydra's
    ``override_dirname``) and the sweep folder; otherwise the overrides or, without any, the run folder's name.
    The ranks of a data-parallel sweep job find the sweep folder in ``MSNET_SWEEP_GROUP`` (:data:`SWEEP_GROUP_ENV`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    inherited = os.environ.get(SWEEP_GROUP_ENV) or None
    if not HydraConfig.initialized():
        return {"name": run_path.name, "group": inherited}
    hc = HydraConfig.get()
    group = str(Path(hc.sweep.dir).resolve()) if hc.mode == RunMode.MULTIRUN else inherited
    return {"name": hc.job.override_dirname or run_path.name, "group": group}


@contextmanager
def _quick_failure() -> Iterator[None]:
    """MLflow's HTTP client retries an unreachable server for minutes (7 retries, backoff up to 2 min); opening
    the run retries once, so that a wrong ``logger.tracking_uri`` fails in seconds. Later requests retry as usual."""
    with scoped_environ({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}):
        yield


@contextmanager
def scoped_environ(values: Dict[str, Optional[str]]) -> Iterator[None]:
    """Environment variables set to ``values`` (None: left as they are) inside the block, put back after it."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _artifact_root(uri: str) -> Optional[Path]:
    """Where a new experiment keeps its figures: ``mlartifacts/`` beside a SQLite store (MLflow would use
    ``./mlruns`` of the current folder); a server's own default for any other store."""
    return Path(uri[len("sqlite:///"):]).parent / "mlartifacts" if uri.startswith("sqlite:///") else None


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Hold ``<db>.lock`` while a SQLite store is opened: the parallel jobs of a joblib sweep would otherwise
    create its tables at the same time and fail ("duplicate column name"). Other stores need no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock = Path(uri[len("sqlite:///"):]).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _saved_state(previous: Optional[Path], logger: str) -> Optional[Dict[str, Any]]:
    if previous is None or not (previous / TRACKING_FILE).is_file():
        return None
    saved = json.loads((previous / TRACKING_FILE).read_text())
    return saved if saved.get("logger") == logger else None


def open_tracker(cfg: DictConfig, run_path: Path, *, name: Optional[str] = None, group: Optional[str] = None,
                 previous: Optional[Path] = None, outputs: Optional[Path] = None) -> Tracker:
    """The tracker ``cfg.logger`` names, for the run writing into ``run_path``.

    ``name``: the run's name (a sweep job's overrides); ``group``: the sweep folder the job belongs to;
    ``previous``: the run directory of the run being resumed (its ``tracking.json`` says which tracked
    run to continue); ``outputs``: the folder of MLflow's default store (``./outputs``). Returns a tracker
    with ``resumed`` True when it continues a tracked run (then the run's earlier rows are not re-sent).
    """
    lg = logger_config(cfg)
    if lg.name == "none":
        return NullTracker()
    run_path.mkdir(parents=True, exist_ok=True)
    saved = _saved_state(previous, str(lg.name))
    if lg.name == "tensorboard":
        log_dir = run_path.resolve() / "tensorboard"
        if lg.get("log_dir"):  # a sweep's jobs each get a subfolder (their job number) under it
            log_dir = Path(lg.log_dir).expanduser().resolve() / (run_path.name if group else "")
        tracker: Tracker = TensorBoardTracker(log_dir, lg.get("flush_secs", 10), saved)
    else:
        outputs = (outputs or Path("outputs"))
        uri = lg.get("tracking_uri") or mlflow_default_uri(outputs)
        tags = {"msnet.run_dir": str(run_path.resolve()), **({"msnet.sweep": group} if group else {})}
        if lg.get("tracking_uri") is None:
            outputs.mkdir(parents=True, exist_ok=True)
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its INFO lines about creating the store
        try:
            with _quick_failure(), _store_lock(uri):
                tracker = MLflowTracker(uri, str(lg.experiment), lg.get("run_name") or name or run_path.name, tags,
                                        _artifact_root(uri), saved)
        except Exception as err:  # an unreachable server, a store that cannot be opened
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise MsnetError(f"logger=mlflow could not open the tracking store {uri} ({first}); "
                             "check logger.tracking_uri, or drop it for the local store in outputs/") from None
    save_state(tracker, run_path)
    return tracker


def save_state(tracker: Tracker, run_path: Path) -> None:
    """Write ``tracking.json`` (which tracked run this run directory feeds, and its counters); nothing for none."""
    if tracker.state() is not None:
        tmp = run_path / f".{TRACKING_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(tracker.state(), indent=2) + "\n")
        tmp.replace(run_path / TRACKING_FILE)

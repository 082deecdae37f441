"""Experiment trackers: whatever a run writes into its run directory also goes to TensorBoard, MLflow or W&B.

:class:`~msnet.runs.rundir.RunDir` is the one writer of a run's records, and it fans each one out to every
tracker ``logger=`` chose (``logger=none`` the default, ``logger=tensorboard``, ``logger=[tensorboard,mlflow]``;
each is one class of the :data:`TRACKERS` registry, opened by :func:`open_trackers`):

- each ``metrics.jsonl`` row (:meth:`AbstractTracker.log_metrics`): its numbers as scalars at step = ``epoch``,
  grouped by their prefix (``train_loss`` is ``train/loss``, ``val_acc`` is ``val/acc``, ``bcd_cg_iters`` is
  ``bcd/cg_iters``: :func:`metric_name`); lists such as ``layers`` become ``layers`` for one entry,
  ``resolution_0``/``resolution_1`` for more; the level's name becomes ``level_index``, 0 for the first level seen;
- each ``steps.jsonl`` row (:meth:`AbstractTracker.log_step`): an update rule's per-iteration diagnostics (BCD,
  MG/OPT, RMTR), as ``step/<key>`` at a counter that runs on over the whole run;
- the resolved config (:meth:`AbstractTracker.log_config`; ``dataset.num_classes``, ``channels`` and
  ``image_size`` as the loaded data has them, :func:`data_facts`) and ``summary.json``'s numbers as
  ``summary/<key>`` (:meth:`AbstractTracker.log_summary`), with the checkpoints as artifacts where
  ``logger.log_checkpoint=true``;
- the run's figures (:meth:`AbstractTracker.log_figure`, :mod:`msnet.runs.plots`).

A resumed run continues the same tracked runs where it can: ``tracking.json`` in the run directory records each
tracker's MLflow run id / TensorBoard folder / W&B run id and its step counter, and a resume from
``<old run>/checkpoints/last.pt`` reads the old run's file. Only rank 0 of a DDP run opens trackers. No tracker's
library is imported before a run opens it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterable, Iterator, List, Optional, Tuple, Type

from omegaconf import DictConfig, OmegaConf

from msnet.errors import MsnetError
from msnet.registry import Registry

TRACKING_FILE = "tracking.json"
SWEEP_GROUP_ENV = "MSNET_SWEEP_GROUP"
"""Set by ``msnet train`` for the torchrun ranks of a sweep job (``trainer.devices=K``): the sweep folder the job
belongs to, which the ranks, started as single runs, cannot read from Hydra."""
METRIC_GROUPS = ("train", "val", "test", "bcd", "rmtr")
"""Prefixes of ``metrics.jsonl`` keys that become a tracker's metric groups: ``train_loss`` -> ``train/loss``."""


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


def metric_name(key: str) -> str:
    """A ``metrics.jsonl`` key as trackers name it: ``train_loss`` -> ``train/loss`` for the prefixes of
    :data:`METRIC_GROUPS`; any other key (``lr``, ``epoch_time_s``, ``level_index``) as it is."""
    group, sep, rest = key.partition("_")
    return f"{group}/{rest}" if sep and rest and group in METRIC_GROUPS else key


def data_facts(data: Any) -> Dict[str, Any]:
    """What the loaded data (a :class:`~msnet.data.DataBundle`) says about the config's dataset keys that only
    the synthetic generator reads: ``dataset.num_classes`` of Fashion-MNIST is 10, not the generator's default 4."""
    h, w = data.image_size
    return {"dataset.num_classes": int(data.num_classes), "dataset.channels": int(data.in_channels),
            "dataset.image_size": h if h == w else [h, w]}


def with_facts(config: Dict[str, Any], facts: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of the nested ``config`` with each dotted key of ``facts`` set to its value."""
    out = json.loads(json.dumps(config, default=str))
    for dotted, value in facts.items():
        *parents, leaf = dotted.split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def checkpoint_files(summary: Dict[str, Any]) -> List[Path]:
    """The checkpoints a summary names that exist (``last.pt``, ``best.pt``), for ``logger.log_checkpoint``."""
    paths = [summary.get("checkpoint"), summary.get("best_checkpoint")]
    return [Path(p) for p in dict.fromkeys(p for p in paths if p) if Path(p).is_file()]


class _Counters:
    """The bookkeeping every tracker shares: level names -> indices, and the running step counter."""

    def __init__(self, saved: Optional[Dict[str, Any]]):
        self.levels: List[str] = list((saved or {}).get("levels", []))
        self.steps = int((saved or {}).get("steps", 0))

    def epoch_scalars(self, record: Dict[str, Any]) -> Dict[str, float]:
        """The row's numbers under their tracker names (:func:`metric_name`), with ``level_index``."""
        values = {metric_name(k): v for k, v in scalars(record, skip=("epoch",)).items()}
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


# --- the trackers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Opening:
    """What a tracker is told about the run it opens for.

    ``name``: the tracked run's name (the run dir's last two folders); ``group``: the sweep folder of a ``-m``
    job (None for a single run); ``overrides``: the job's overrides (``k=v,k=v``); ``outputs``: the folder of
    MLflow's default store; ``saved``: this tracker's entry of the resumed run's ``tracking.json``;
    ``log_checkpoint``: ``logger.log_checkpoint``.
    """

    run_path: Path
    name: str
    group: Optional[str] = None
    overrides: Optional[str] = None
    outputs: Path = Path("outputs")
    saved: Optional[Dict[str, Any]] = None
    log_checkpoint: bool = False


class AbstractTracker(ABC):
    """One tracker: its facts (the modules it imports, the extra that installs them, whether it stores files)
    and what a run directory fans out to it (see the module docstring for what each method receives)."""

    name: ClassVar[str]
    modules: ClassVar[Tuple[str, ...]]  # what must import for it to work
    extra: ClassVar[str]  # the msnet extra that installs them: pip install 'msnet[EXTRA]'
    stores_files: ClassVar[bool] = False  # has an artifact store (logger.log_checkpoint)
    hint: ClassVar[str]  # what to check when it fails mid-run
    resumed: bool = False  # continues a tracked run (a resume): the run's earlier rows are there already

    @classmethod
    def install(cls) -> str:
        """The command that installs what it needs."""
        return f"pip install 'msnet[{cls.extra}]'"

    @classmethod
    def check_import(cls) -> None:
        """Fail in one line naming :meth:`install` when one of :attr:`modules` does not import."""
        package, install = cls.modules[0], cls.install()
        try:
            for module in cls.modules:
                __import__(module)  # the builtin, so that a test can hide a package
        except ImportError as err:
            raise MsnetError(f"logger={cls.name} needs the {package} package ({err}); install it with: "
                             f"{install}") from None

    @classmethod
    @abstractmethod
    def from_config(cls, settings: DictConfig, opening: Opening) -> "AbstractTracker":
        """The tracker for ``logger.<name>`` = ``settings``, opened for the run ``opening`` describes."""

    @abstractmethod
    def state(self) -> Dict[str, Any]:
        """What ``tracking.json`` keeps for a resume."""

    @abstractmethod
    def log_config(self, config: Dict[str, Any]) -> None: ...

    @abstractmethod
    def log_metrics(self, record: Dict[str, Any]) -> None: ...

    @abstractmethod
    def log_step(self, record: Dict[str, Any]) -> None: ...

    @abstractmethod
    def log_summary(self, summary: Dict[str, Any]) -> None: ...

    @abstractmethod
    def log_figure(self, name: str, figure: Any) -> None:
        """Draw the matplotlib figure into the tracker (the run directory closes it after every tracker)."""

    @abstractmethod
    def close(self) -> None: ...


TRACKERS: Registry[Type[AbstractTracker]] = Registry("logger")
"""``logger=NAME`` -> the tracker class; its settings are ``logger.NAME`` (:class:`msnet.config.LoggerConfig`)."""


@TRACKERS.register("tensorboard")
class TensorBoardTracker(AbstractTracker):
    """``logger=tensorboard``: one event-file folder per run (torch's ``SummaryWriter``).

    Epoch rows are scalars at step = epoch; step rows are ``step/<key>``; the config and the summary's numbers
    (``summary/<key>``) are one hparams entry (the HPARAMS tab). A resumed run writes into the same folder, its
    steps continuing where they were. No artifact store: the checkpoints stay in the run directory.
    """

    name = "tensorboard"
    modules = ("tensorboard", "torch.utils.tensorboard")  # torch's SummaryWriter needs the tensorboard package
    extra = "tensorboard"
    hint = "the disk under its log_dir"

    def __init__(self, log_dir: Path, flush_secs: int, saved: Optional[Dict[str, Any]] = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(saved["log_dir"]) if saved and saved.get("log_dir") else log_dir
        self.counters = _Counters(saved)
        self.resumed = saved is not None
        self.writer = SummaryWriter(str(self.log_dir), flush_secs=int(flush_secs))
        self.config: Dict[str, Any] = {}
        self.epoch = 0

    @classmethod
    def from_config(cls, settings: DictConfig, opening: Opening) -> "TensorBoardTracker":
        """Event files in ``<run dir>/tensorboard``, or under ``logger.tensorboard.log_dir`` (a sweep's jobs each in
        a subfolder named by their job number)."""
        log_dir = opening.run_path.resolve() / "tensorboard"
        if settings.log_dir:
            log_dir = Path(settings.log_dir).expanduser().resolve() / (opening.run_path.name if opening.group else "")
        return cls(log_dir, settings.flush_secs, opening.saved)

    def state(self) -> Dict[str, Any]:
        """The event folder and the counters."""
        return {"log_dir": str(self.log_dir), **self.counters.to_dict()}

    def log_config(self, config: Dict[str, Any]) -> None:
        """Kept until the summary: TensorBoard shows hparams beside the final metrics."""
        self.config = flatten_config(config)

    def log_metrics(self, record: Dict[str, Any]) -> None:
        """Each number of the row at step = the row's epoch."""
        self.epoch = int(record.get("epoch", self.epoch))
        for key, value in self.counters.epoch_scalars(record).items():
            self.writer.add_scalar(key, value, self.epoch)

    def log_step(self, record: Dict[str, Any]) -> None:
        """Each number of the row as ``step/<key>`` at the next step."""
        step = self.counters.next_step()
        for key, value in scalars(record).items():
            self.writer.add_scalar(f"step/{key}", value, step)

    def log_summary(self, summary: Dict[str, Any]) -> None:
        """The config as hparams, with the summary's numbers as ``summary/<key>`` metrics."""
        from torch.utils.tensorboard.summary import hparams

        final = {f"summary/{k}": v for k, v in scalars(summary, skip=("levels", "data_sizes")).items()}
        exp, ssi, sei = hparams(self.config, final)
        for event in (exp, ssi, sei):
            self.writer.file_writer.add_summary(event)
        for key, value in final.items():
            self.writer.add_scalar(key, value, self.epoch)
        self.writer.flush()

    def log_figure(self, name: str, figure: Any) -> None:
        """The figure as an image ``figures/<name>`` at the last epoch."""
        self.writer.add_figure(f"figures/{name}", figure, self.epoch, close=False)

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def mlflow_default_uri(root: Path) -> str:
    """The local store inside the outputs folder ``root``: ``sqlite:///<abs root>/mlflow.db``."""
    return f"sqlite:///{root.resolve() / 'mlflow.db'}"


@TRACKERS.register("mlflow")
class MLflowTracker(AbstractTracker):
    """``logger=mlflow``: one MLflow run (per sweep job) in experiment ``logger.mlflow.experiment``.

    Epoch rows are metrics at step = epoch; step rows are ``step/<key>`` metrics; the flattened config is the
    run's params; the summary's numbers are ``summary/<key>`` metrics; figures are artifacts under ``figures/``,
    checkpoints (``logger.log_checkpoint``) under ``checkpoints/``. A resumed run reopens the same MLflow run
    (its id in ``tracking.json``).
    """

    name = "mlflow"
    modules = ("mlflow",)
    extra = "mlflow"
    stores_files = True
    hint = "logger.mlflow.tracking_uri, the disk"

    def __init__(self, uri: str, experiment: str, run_name: str, tags: Dict[str, str], artifacts: Optional[Path],
                 saved: Optional[Dict[str, Any]] = None, log_checkpoint: bool = False):
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
        self.log_checkpoint = log_checkpoint
        self.epoch = 0
        self.status = "FAILED"  # until a summary says otherwise

    @classmethod
    def from_config(cls, settings: DictConfig, opening: Opening) -> "MLflowTracker":
        """A run in ``logger.mlflow.tracking_uri`` (default: ``outputs/mlflow.db``), named ``run_name`` or the run's
        short name, tagged with the run directory, the job's overrides and its sweep. An unreachable store fails in
        seconds, in one line."""
        uri = settings.tracking_uri or mlflow_default_uri(opening.outputs)
        tags = {"msnet.run_dir": str(opening.run_path.resolve()),
                **({"msnet.overrides": opening.overrides[:5000]} if opening.overrides else {}),
                **({"msnet.sweep": opening.group} if opening.group else {})}
        if settings.tracking_uri is None:
            opening.outputs.mkdir(parents=True, exist_ok=True)
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its INFO lines about creating the store
        try:
            with _quick_failure(), _store_lock(uri):
                return cls(uri, str(settings.experiment), settings.run_name or opening.name, tags, _artifact_root(uri),
                           opening.saved, opening.log_checkpoint)
        except Exception as err:  # an unreachable server, a store that cannot be opened
            raise MsnetError(f"logger=mlflow could not open the tracking store {uri} ({_first_line(err)}); "
                             "check logger.mlflow.tracking_uri, or drop it for the local store in outputs/") from None

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
        """The store, the run id and the counters."""
        return {"tracking_uri": self.uri, "run_id": self.run_id, **self.counters.to_dict()}

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
        """Each number of the row as ``step/<key>`` at the next step."""
        step = self.counters.next_step()
        self._metrics({f"step/{k}": v for k, v in scalars(record).items()}, step)

    def log_summary(self, summary: Dict[str, Any]) -> None:
        """The summary's numbers as ``summary/<key>`` metrics, its status as the run's status, and with
        ``logger.log_checkpoint`` the checkpoints as artifacts ``checkpoints/last.pt``, ``checkpoints/best.pt``."""
        self._metrics({f"summary/{k}": v for k, v in scalars(summary, skip=("levels", "data_sizes")).items()},
                      self.epoch)
        self.client.set_tag(self.run_id, "msnet.status", str(summary.get("status")))
        if self.log_checkpoint:
            for path in checkpoint_files(summary):
                self.client.log_artifact(self.run_id, str(path), artifact_path="checkpoints")
        self.status = {"completed": "FINISHED", "interrupted": "KILLED"}.get(summary.get("status"), "FAILED")

    def log_figure(self, name: str, figure: Any) -> None:
        """The figure as the artifact ``figures/<name>.png``."""
        self.client.log_figure(self.run_id, figure, f"figures/{name}.png")

    def close(self) -> None:
        """End the MLflow run with the summary's status (FAILED when the run ended without one)."""
        self.client.set_terminated(self.run_id, status=self.status)


@TRACKERS.register("wandb")
class WandbTracker(AbstractTracker):
    """``logger=wandb``: one Weights & Biases run (per sweep job, grouped by its sweep) in ``logger.wandb.project``.

    Epoch rows are history at the step metric ``epoch``; step rows are ``step/<key>`` at the step metric ``step``;
    the resolved config is the run's config; the summary's numbers are ``summary/<key>`` in the run's summary;
    figures are images ``figures/<name>``; checkpoints (``logger.log_checkpoint``) one ``model`` artifact.
    ``mode=offline`` (the default) writes ``<dir>/wandb/offline-run-*`` and needs no network (``wandb sync``
    uploads it). An online resume continues the same W&B run; an offline one starts a new W&B run, sent the
    resumed run's earlier epochs first.
    """

    name = "wandb"
    modules = ("wandb",)
    extra = "wandb"
    stores_files = True
    hint = "logger.wandb.mode, the network"

    def __init__(self, run: Any, mode: str, log_checkpoint: bool, saved: Optional[Dict[str, Any]] = None):
        self.run, self.mode, self.log_checkpoint = run, mode, log_checkpoint
        self.counters = _Counters(saved)
        self.resumed = saved is not None
        self.defined: set = set()
        self.epoch = 0
        self.exit_code = 1  # until a summary says the run completed
        run.define_metric("epoch")
        run.define_metric("step")
        run.define_metric("step/*", step_metric="step")

    @classmethod
    def from_config(cls, settings: DictConfig, opening: Opening) -> "WandbTracker":
        """A W&B run writing under ``logger.wandb.dir`` (default: the run directory). A run that cannot start
        (online without ``wandb login``, a project it may not write to) fails in one line."""
        import wandb

        mode = str(settings.mode)
        saved = opening.saved if mode == "online" and opening.saved and opening.saved.get("run_id") else None
        where = Path(settings.dir).expanduser() if settings.dir else opening.run_path
        where.mkdir(parents=True, exist_ok=True)
        group = settings.group or opening.group
        try:
            # create_new: a run of its own, not wandb's global one (msnet.train twice in one process, or one left
            # open by a tracker that failed); console off: msnet's console.txt already holds what the run printed
            run = wandb.init(project=settings.project, entity=settings.entity, mode=mode, dir=str(where),
                             name=settings.name or opening.name, group=group[-128:] if group else None,
                             tags=list(settings.tags) or None, id=saved["run_id"] if saved else None,
                             resume="allow" if saved else None, reinit="create_new",
                             settings=wandb.Settings(console="off", silent=True))
        except Exception as err:
            raise MsnetError(f"logger=wandb could not start its run ({_first_line(err)}); check logger.wandb.mode "
                             "(offline needs no network or login; online needs wandb login) and "
                             "logger.wandb.project / logger.wandb.entity") from None
        return cls(run, mode, opening.log_checkpoint, saved)

    def state(self) -> Dict[str, Any]:
        """The run's id, mode and project, and the counters."""
        return {"run_id": self.run.id, "mode": self.mode, "project": self.run.project, **self.counters.to_dict()}

    def log_config(self, config: Dict[str, Any]) -> None:
        """The nested config as the run's config (a resume's overrides replace the values they change)."""
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, record: Dict[str, Any]) -> None:
        """Each number of the row, at the step metric ``epoch``."""
        self.epoch = int(record.get("epoch", self.epoch))
        values = self.counters.epoch_scalars(record)
        for key in values.keys() - self.defined:
            self.run.define_metric(key, step_metric="epoch")
            self.defined.add(key)
        self.run.log({**values, "epoch": self.epoch})

    def log_step(self, record: Dict[str, Any]) -> None:
        """Each number of the row as ``step/<key>``, at the step metric ``step``."""
        self.run.log({"step": self.counters.next_step(), **{f"step/{k}": v for k, v in scalars(record).items()}})

    def log_summary(self, summary: Dict[str, Any]) -> None:
        """The summary's numbers as ``summary/<key>`` in the run's summary, and with ``logger.log_checkpoint`` the
        checkpoints as one artifact of type ``model``."""
        self.run.summary.update({f"summary/{k}": v for k, v in scalars(summary, skip=("levels", "data_sizes")).items()})
        self.run.summary["summary/status"] = str(summary.get("status"))
        files = checkpoint_files(summary) if self.log_checkpoint else []
        if files:
            import wandb

            artifact = wandb.Artifact(f"checkpoints-{self.run.id}", type="model")
            for path in files:
                artifact.add_file(str(path), name=path.name)
            self.run.log_artifact(artifact)
        self.exit_code = 0 if summary.get("status") == "completed" else 1

    def log_figure(self, name: str, figure: Any) -> None:
        """The figure as the image ``figures/<name>``."""
        import wandb

        self.run.log({f"figures/{name}": wandb.Image(figure)})

    def close(self) -> None:
        """Finish the W&B run: finished when the run completed, failed otherwise."""
        self.run.finish(exit_code=self.exit_code)


# --- choosing them --------------------------------------------------------------------------------


def logger_config(cfg: DictConfig) -> DictConfig:
    """``cfg.logger`` on its schema (:class:`msnet.config.LoggerConfig`), merged once so that the rest reads plain
    attributes. Configs saved before the registry (old checkpoints) name one tracker as ``logger.name`` with its
    keys beside it (``{name: mlflow, experiment: ...}``), or have no logger at all; both read as today's form.
    An unknown tracker name fails in one line listing the choices."""
    from msnet.config import LoggerConfig

    found = OmegaConf.select(cfg, "logger", default=None)
    raw: Dict[str, Any] = OmegaConf.to_container(found, resolve=True) if isinstance(found, DictConfig) else {}
    own = set(LoggerConfig.__dataclass_fields__)
    name = raw.pop("name", None)
    if name is not None and str(name) != "none":
        TRACKERS.get(str(name))
        flat = {k: raw.pop(k) for k in list(raw) if k not in own}
        raw[str(name)] = {**flat, **(raw.get(str(name)) or {})}
    for key in raw:
        if key not in own:
            TRACKERS.get(key)
    return OmegaConf.merge(OmegaConf.structured(LoggerConfig), raw)


def chosen(lg: DictConfig) -> List[Tuple[str, Type[AbstractTracker]]]:
    """The trackers ``logger=`` chose, in the registry's order: ``(name, class)``."""
    return [(name, TRACKERS.get(name)) for name in TRACKERS if lg.get(name) is not None]


def check_backend(cfg: DictConfig) -> None:
    """Fail in one line when a chosen tracker's library is not importable (naming the pip command), or when
    ``logger.log_checkpoint=true`` has no tracker that stores files.

    Called by the preflight (:func:`msnet.training.setup.check_config`), before data is loaded.
    """
    lg = logger_config(cfg)
    trackers = chosen(lg)
    for _, cls in trackers:
        cls.check_import()
    if lg.log_checkpoint and not any(cls.stores_files for _, cls in trackers):
        has = f"logger={','.join(n for n, _ in trackers)} stores no files" if trackers else "no tracker is chosen"
        raise MsnetError(f"logger.log_checkpoint=true sends the checkpoints to MLflow or W&B, but {has}; add "
                         "logger=mlflow or logger=wandb (several: logger=[tensorboard,mlflow]), or drop it")


def short_name(path: Path) -> str:
    """A run's name in a tracker's list: its folder's last two parts (``DATE/TIME``; a sweep job's ``TIME/JOB``)."""
    return "/".join(path.resolve().parts[-2:])


def job_identity(run_path: Path) -> Dict[str, Optional[str]]:
    """The tracked run's name (:func:`short_name`), group and overrides: in a ``-m`` sweep job, the sweep folder
    and the job's overrides (``k=v,k=v``, Hydra's ``override_dirname``); in a single run, no group.
    The ranks of a data-parallel sweep job find the sweep folder in ``MSNET_SWEEP_GROUP`` (:data:`SWEEP_GROUP_ENV`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    inherited = os.environ.get(SWEEP_GROUP_ENV) or None
    if not HydraConfig.initialized():
        return {"name": short_name(run_path), "group": inherited, "overrides": None}
    hc = HydraConfig.get()
    group = str(Path(hc.sweep.dir).resolve()) if hc.mode == RunMode.MULTIRUN else inherited
    return {"name": short_name(run_path), "group": group, "overrides": hc.job.override_dirname or None}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__


@contextmanager
def _quick_failure() -> Iterator[None]:
    """MLflow's HTTP client retries an unreachable server for minutes (7 retries, backoff up to 2 min); opening
    the run retries once, so that a wrong ``logger.mlflow.tracking_uri`` fails in seconds. Later requests retry
    as usual."""
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


def saved_states(previous: Optional[Path]) -> Dict[str, Dict[str, Any]]:
    """Each tracker's entry of ``previous/tracking.json`` by name ({} without one). A file written before several
    trackers could run at once holds one tracker, named by its ``logger`` key."""
    if previous is None or not (previous / TRACKING_FILE).is_file():
        return {}
    saved = json.loads((previous / TRACKING_FILE).read_text())
    if "logger" in saved:
        return {saved["logger"]: saved}
    return dict(saved.get("trackers", {}))


def open_trackers(cfg: DictConfig, run_path: Path, *, name: Optional[str] = None, group: Optional[str] = None,
                  overrides: Optional[str] = None, previous: Optional[Path] = None,
                  outputs: Optional[Path] = None) -> List[AbstractTracker]:
    """The trackers ``cfg.logger`` chose ([] for ``logger=none``), for the run writing into ``run_path``.

    ``name``: the run's name (default :func:`short_name`); ``group``: the sweep folder the job belongs to;
    ``overrides``: the job's overrides; ``previous``: the run directory of the run being resumed (its
    ``tracking.json`` says which tracked runs to continue); ``outputs``: the folder of MLflow's default store
    (``./outputs``). Each tracker has ``resumed`` True when it continues a tracked run (then the run's earlier
    rows are not re-sent to it). When one cannot open, those opened before it are closed and its error raised.
    """
    lg = logger_config(cfg)
    trackers = chosen(lg)
    if not trackers:
        return []
    run_path.mkdir(parents=True, exist_ok=True)
    saved = saved_states(previous)
    opened: List[AbstractTracker] = []
    try:
        for tracker_name, cls in trackers:
            opening = Opening(run_path, name or short_name(run_path), group, overrides, outputs or Path("outputs"),
                              saved.get(tracker_name), bool(lg.log_checkpoint))
            opened.append(cls.from_config(lg[tracker_name], opening))
    except BaseException:
        for tracker in opened:
            try:
                tracker.close()
            except Exception:  # the error that stopped the opening is the one to report
                pass
        raise
    save_state(opened, run_path)
    return opened


def save_state(trackers: List[AbstractTracker], run_path: Path) -> None:
    """Write ``tracking.json`` (which tracked run each tracker of this run directory feeds, and its counters:
    ``{"trackers": {name: state}}``); nothing without trackers."""
    if trackers:
        states = {t.name: t.state() for t in trackers}
        tmp = run_path / f".{TRACKING_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"trackers": states}, indent=2) + "\n")
        tmp.replace(run_path / TRACKING_FILE)

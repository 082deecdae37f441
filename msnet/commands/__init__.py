"""One thin Hydra entry point per subcommand; the work lives in importable modules."""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from msnet.errors import MsnetError
from msnet.config import Objective, missing_key, register_configs

# Optuna (hydra/sweeper=optuna) imports alembic, whose plugin registry logs seven "setup plugin" INFO lines
# that Hydra's logging would print at the top of every study.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
CONFIG_PATH = "pkg://msnet.conf"
OPTUNA_RESULTS = "optimization_results.yaml"
"""What the Optuna sweeper writes into the sweep folder: the study's best params and value."""
register_configs()
# conf/hydra/launcher/{joblib,submitit_slurm}.yaml and conf/hydra/sweeper/optuna.yaml deliberately replace
# the plugins' configs of the same name (so `hydra/launcher=joblib` gets msnet's defaults); Hydra then checks them against
# the plugins' schemas and warns that this matching is deprecated. Each preset names its own
# _target_, so it does not depend on the matching.
warnings.filterwarnings(
    "ignore", message=r"\s*'hydra/(launcher|sweeper)/\w+' is validated against ConfigStore schema with the same name"
)


@contextmanager
def errors_as_lines(run_dir: Optional[str | Path] = None) -> Iterator[None]:
    """Turn :class:`MsnetError` into one ``error: ...`` line on stderr and exit code 2.

    The line is also written to ``run_dir/error.txt``. Inside a ``-m`` sweep the job
    fails alone: the error is reported and the sweep goes on to the next job; any other
    exception of a sweep job is kept too (traceback on stderr and in ``error.txt``), and
    :class:`SweepFailures` ends the sweep with exit code 2 naming the failed jobs. An
    ``error.txt`` left by an earlier run into the same directory is removed first.

    Under torchrun every rank meets the same :class:`MsnetError` (they run the same checks on
    the same config and all-reduced numbers), so only rank 0 prints and writes it; the other
    ranks exit with code 2 silently.
    """
    main_rank = os.environ.get("RANK", "0") == "0"
    if run_dir is not None and main_rank:
        (Path(run_dir) / "error.txt").unlink(missing_ok=True)
    try:
        yield
    except MsnetError as err:
        message = str(err)
        if main_rank:
            print(f"error: {message}", file=sys.stderr, flush=True)
            _write_error(run_dir, message)
        if _in_sweep():
            return
        raise SystemExit(2) from None
    except Exception:
        if not _in_sweep():
            raise
        trace = traceback.format_exc()
        print(trace, file=sys.stderr, flush=True)
        _write_error(run_dir, trace.rstrip())


@contextmanager
def composition_errors_as_lines() -> Iterator[None]:
    """While a subcommand's Hydra main runs: a value of the wrong type ends in one line, exit code 2.

    Hydra composes the config before the main is called, and reports an override that the typed
    schema refuses (``optimizer.lr=abc``, ``seed=null``, ``model.backprop=foo``) itself, in several
    lines and with exit code 1. It does so in ``hydra._internal.utils.run_and_report``, the one
    place every composition (a run, each job of a ``-m`` sweep, ``--cfg``) goes through and which
    has no public hook; for the duration of the main this wraps the function it is handed, so that a
    :class:`~hydra.errors.ConfigCompositionException` caused by an OmegaConf ``ValidationError`` is
    printed as :func:`type_error_line`. Every other error keeps Hydra's report, and with
    ``HYDRA_FULL_ERROR=1`` Hydra's full traceback is kept too.
    """
    from hydra._internal import utils as hydra_utils
    from hydra.errors import ConfigCompositionException

    original = hydra_utils.run_and_report

    def run_and_report(func: Any) -> Any:
        def composed() -> Any:
            try:
                return func()
            except (ConfigCompositionException, AssertionError) as ex:
                line = None if os.environ.get("HYDRA_FULL_ERROR") == "1" else (
                    type_error_line(ex) or unselected_group_line(ex, sys.argv[1:]))
                if line is None:
                    raise
                print(f"error: {line}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None

        return original(composed)

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = original


def type_error_line(ex: BaseException) -> Optional[str]:
    """One line for a composition error caused by an override the schema refuses (None for any other).

    A value of the wrong type names the key, the value typed and what the key takes, with the value
    it had as an example (``optimizer.lr=abc: optimizer.lr takes a number, e.g. optimizer.lr=0.002``);
    a key the schema lacks names the closest keys it has (``model.layres=3: model has no key
    'layres'; did you mean layers?``); a group option that does not exist names the group's options
    (``dataset=imagenet: the group dataset has no option 'imagenet'; choose one of cifar10, ...``);
    an optional group typed without its plus says to add it (``pyramid=2level: ... +pyramid=2level``).
    """
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    if isinstance(ex, MissingConfigException) and ex.missing_cfg_file and "/" in ex.missing_cfg_file:
        group, _, option = ex.missing_cfg_file.rpartition("/")
        # Hydra lists no options for an entry of a list (logger=[tensorboard,foo]): the group's files then
        options = sorted(o for o in ex.options or _options(group) if not o.endswith("_schema"))  # schemas stored in the group are not options
        if options:
            return f"{group}={option}: the group {group} has no option {option!r}; choose one of {', '.join(options)}"
    appended = str(ex).partition("To append to your default list use +")[2].strip()
    if str(ex).startswith("Could not override") and appended:
        group = appended.partition("=")[0]
        return f"{appended}: {group} is not in the defaults list; add it with a plus: +{appended}"
    cause = ex.__cause__
    text = str(ex)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key and cause.parent_node is not None:
        typed = text.partition("To append to your config use +")[2].strip() or cause.full_key
        return f"{typed}: {missing_key(cause.full_key, list(cause.parent_node.keys()))}"
    if not isinstance(cause, ValidationError) or not cause.full_key:
        return None
    typed = text.partition("Error merging override ")[2].strip() or f"{cause.full_key}={cause.value}"
    node = cause.child_node
    if node is None:
        return f"{typed}: {str(cause.msg).splitlines()[0]}"
    meta = node._metadata
    takes = _type_name(meta.ref_type) + (" or null" if meta.optional else "")
    return f"{typed}: {cause.full_key} takes {takes}, e.g. {cause.full_key}={_shown(node._value())}"


def unselected_group_line(ex: BaseException, overrides: List[str]) -> Optional[str]:
    """One line for a key set inside an optional group that is off (``depth.sizing=cost`` without ``+depth=...``).

    The group's node is null until it is selected, OmegaConf cannot set a key under a null, and Hydra stops
    on an assertion with a traceback; the line says to select the group first. None for any other error.
    """
    if not isinstance(ex, AssertionError) or "Unexpected type for root: NoneType" not in str(ex):
        return None
    for override in [o for o in overrides if "=" in o and not o.startswith("-")]:
        key = override.lstrip("+~").split("=", 1)[0]
        off = _off_node(key, overrides)
        if off is None:
            continue
        parent, _, option = off.rpartition(".")
        if parent:  # a group option under a key of its own, e.g. logger.mlflow
            return (f"{override}: {off} is off, so its keys cannot be set; select it first, "
                    f"e.g. {parent}={option} {override}")
        group = off  # an optional group of the defaults list, e.g. depth
        return (f"{override}: the group {group} is off, so its keys cannot be set; select it first, "
                f"e.g. +{group}={_options(group)[0]} {override}")
    return None


def _options(group: str) -> List[str]:
    """The options of a config group: its YAML files in msnet.conf, by name."""
    from importlib.resources import files

    folder = files("msnet.conf") / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")) if folder.is_dir() else []


def _off_node(key: str, overrides: List[str]) -> Optional[str]:
    """The null node of msnet train's schema that ``key`` lies under and that no override selects: ``depth`` for
    ``depth.sizing`` without ``+depth=...``, ``logger.mlflow`` for ``logger.mlflow.experiment`` without
    ``logger=mlflow`` (a group option of that name exists); None for a key under no such node."""
    from omegaconf import OmegaConf

    from msnet.config import TrainConfig

    typed = {o.lstrip("+~").split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if "=" in o}
    node, parts = OmegaConf.structured(TrainConfig), key.split(".")
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        child = node._get_node(part)
        if child._is_none():
            group = ".".join(parts[:i])
            if not group:
                return part if part not in typed and _options(part) else None
            chosen = typed.get(group, "").strip("[]").split(",")
            return f"{group}.{part}" if part in _options(group.replace(".", "/")) and part not in chosen else None
        node = child
    return None


def _shown(value: Any) -> str:
    """A value as one would type it in an override."""
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def _type_name(ref_type: Any) -> str:
    """How a line names an OmegaConf node's type: ``a float``, ``one of store, reversible``, ..."""
    if isinstance(ref_type, type) and issubclass(ref_type, Enum):
        return "one of " + ", ".join(m.name for m in ref_type)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(ref_type, getattr(ref_type, "__name__", str(ref_type)))


def _write_error(run_dir: Optional[str | Path], message: str) -> None:
    if run_dir is not None and Path(run_dir).is_dir():
        (Path(run_dir) / "error.txt").write_text(message + "\n")


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def check_objective(cfg: DictConfig) -> None:
    """In a job of an Optuna study (``hydra/sweeper=optuna``): its objective has a value to return, and the
    study's direction is the objective's (``trainer.objective``: accuracies maximised, losses minimised).

    Raises :class:`MsnetError` before anything trains; outside an Optuna study it does nothing.
    """
    from hydra.core.hydra_config import HydraConfig

    if not _in_sweep() or "optuna" not in str(HydraConfig.get().sweeper.get("_target_", "")).lower():
        return
    objective = Objective(cfg.trainer.objective)
    if int(cfg.dataset.val_size) == 0:
        raise MsnetError(f"trainer.objective={objective} is a validation metric, but dataset.val_size=0 holds out "
                         f"no validation images; set dataset.val_size=N")
    direction = HydraConfig.get().sweeper.get("direction")
    name = str(getattr(direction, "name", direction))
    if name in ("minimize", "maximize") and name != objective.direction:
        raise MsnetError(f"hydra.sweeper.direction={name}, but trainer.objective={objective} is to {objective.direction}; "
                         f"drop the direction override (the optuna preset takes it from trainer.objective)")


def study_storage_problem(config: DictConfig) -> Optional[str]:
    """The one line to print when an Optuna study's ``hydra.sweeper.storage`` cannot be opened (None when it can).

    ``hydra-optuna-sweeper`` 1.3 pins Optuna < 3, whose database storage needs SQLAlchemy < 2, while
    mlflow (``logger=mlflow``, the ``mlflow`` extra) needs SQLAlchemy 2: with both installed, as
    ``scripts/setup.sh`` installs them, a database study ends in an ``AssertionError`` deep inside
    Optuna after the sweep has started. The in-memory study (no storage) is unaffected.
    """
    sweeper = config.hydra.get("sweeper") or {}
    storage = sweeper.get("storage")
    if "optuna" not in str(sweeper.get("_target_", "")).lower() or not isinstance(storage, str):
        return None
    if storage.startswith("redis"):
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        optuna_version, sqlalchemy_version = version("optuna"), version("sqlalchemy")
    except PackageNotFoundError:
        return None
    if int(optuna_version.split(".")[0]) >= 3 or int(sqlalchemy_version.split(".")[0]) < 2:
        return None
    return (f"hydra.sweeper.storage={storage}: Optuna {optuna_version} (the newest hydra-optuna-sweeper allows) "
            f"cannot open a database with SQLAlchemy {sqlalchemy_version} (which mlflow needs); drop "
            f"hydra.sweeper.storage to keep the study in memory (every trial stays in the sweep folder for "
            f"msnet report), or use a separate environment with 'sqlalchemy<2' 'alembic<1.14' and no mlflow")


class StudyStorageCheck(Callback):
    """A Hydra callback (``conf/hydra/default.yaml``): before a ``-m`` sweep starts, an Optuna study whose
    ``hydra.sweeper.storage`` this environment cannot open ends in one line, exit code 2
    (:func:`study_storage_problem`), before any trial runs or any folder is written."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problem = study_storage_problem(config)
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr, flush=True)
            raise SystemExit(2)


class SweepFailures(Callback):
    """A Hydra callback (``conf/hydra/default.yaml``): after a ``-m`` sweep, exit with code 2 if a job failed.

    Jobs may run in other processes or on other machines (joblib, SLURM), so the failures are
    read from the sweep folder: the ``error.txt`` files that :func:`errors_as_lines` wrote during
    this sweep (new, or changed since it started). Every other job's results stay in place.

    An Optuna study (``hydra/sweeper=optuna``) is the exception: its failed trials are outcomes of the
    search (a diverging learning rate), recorded as the worst value, so when the study found a best
    trial (a finite ``best_value`` in the ``optimization_results.yaml`` it wrote) the failures are named
    in a warning line and the exit code stays 0.
    """

    def __init__(self) -> None:
        self.sweep_dir: Optional[Path] = None
        self.before: Dict[Path, float] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.before = {p: p.stat().st_mtime for p in [*_error_files(self.sweep_dir), self.sweep_dir / OPTUNA_RESULTS]
                       if p.exists()}

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = self.sweep_dir or Path(str(config.hydra.sweep.dir))
        failed = [p for p in _error_files(sweep_dir) if self.before.get(p) != p.stat().st_mtime]
        if not failed:
            return
        jobs = "; ".join(f"{p} ({_last_line(p)})" for p in failed)
        plural = "s" if len(failed) > 1 else ""
        if self._study_found_best(sweep_dir):
            print(f"warning: {len(failed)} trial{plural} of the Optuna study failed and counted as the worst value: "
                  f"{jobs}; the best trial is in {sweep_dir / OPTUNA_RESULTS}", file=sys.stderr, flush=True)
            return
        print(f"error: {len(failed)} job{plural} of the sweep failed: {jobs}; "
              f"the other jobs' results are in {sweep_dir}", file=sys.stderr, flush=True)
        raise SystemExit(2)

    def _study_found_best(self, sweep_dir: Path) -> bool:
        """This sweep was an Optuna study that wrote a finite best value (not every trial failed)."""
        import math

        import yaml

        results = sweep_dir / OPTUNA_RESULTS
        if not results.exists() or self.before.get(results) == results.stat().st_mtime:
            return False
        best = (yaml.safe_load(results.read_text()) or {}).get("best_value")
        return isinstance(best, (int, float)) and math.isfinite(best)


def _error_files(sweep_dir: Path) -> List[Path]:
    if not sweep_dir.is_dir():
        return []
    # job 2 before job 10
    return sorted(sweep_dir.glob("**/error.txt"), key=lambda p: [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in p.parts])


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"

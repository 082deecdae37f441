"""The Python entry point: ``msnet.train([...])``, ``msnet.evaluate([...])``, ``msnet.transfer([...])``.

Each composes the config the command line would (Hydra's compose API over ``msnet.conf`` and its
schemas, the same overrides) and runs the same task as a Hydra job, so the run directory is the one
``msnet COMMAND OVERRIDES`` writes (``config.yaml``, ``command.txt``, ``.hydra/``, ``metrics.jsonl``,
``summary.json``, ``console.txt``, ``checkpoints/``), under ``outputs/COMMAND/DATE/TIME`` of the current
directory unless ``run_dir`` is given. Two things differ, both on purpose:

- bad input raises :class:`msnet.MsnetError` (one line that names the fix) instead of printing it and
  exiting with code 2;
- the caller's logging is left alone: Hydra's job logging is not configured, so the run folder has
  no ``COMMAND.log`` (msnet writes everything it prints to ``console.txt``).

Hydra's global state (``GlobalHydra``, ``HydraConfig``) is saved before a call and put back after it,
so calls may follow one another in one process, run inside a test, or inside another Hydra app.
Nothing here imports torch until a function is called.
"""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from msnet.errors import MsnetError
from msnet.cli import quote


def train(overrides: Sequence[str] = (), *, run_dir: Optional[str | Path] = None) -> Dict[str, Any]:
    """Train as ``msnet train OVERRIDES`` does and return the run's summary (``summary.json`` as a dict).

    ``overrides``: Hydra overrides as typed on the command line, e.g. ``["model.layers=8",
    "trainer.epochs=1"]``. ``run_dir``: the run folder (default ``outputs/train/DATE/TIME``).
    The summary's ``run_dir`` says where the run was written.
    """
    from msnet.commands.train import run

    def task(cfg: Any) -> Dict[str, Any]:
        try:
            summary = run(cfg)
        except SystemExit as stop:  # the torchrun ranks of trainer.devices=K failed; they printed why
            error = Path(_output_dir()) / "error.txt"
            reason = error.read_text().strip().splitlines()[-1] if error.exists() else f"exit code {stop.code}"
            raise MsnetError(f"the training processes failed: {reason}") from None
        assert summary is not None
        return summary

    return run_command("train", task, overrides, run_dir)


def evaluate(overrides: Sequence[str] = (), *, ckpt: Optional[str | Path] = None,
             run_dir: Optional[str | Path] = None) -> List[Dict[str, Any]]:
    """Evaluate a checkpoint as ``msnet evaluate ckpt=PATH OVERRIDES`` does; returns one record per split
    (``split``, ``loss``, ``acc`` in [0, 1], ``n`` images), also written to ``run_dir/evaluation.json``."""
    from msnet.tasks.evaluate import evaluate_checkpoint

    extra = [f"ckpt={path_value(ckpt)}"] if ckpt is not None else []
    return run_command("evaluate", lambda cfg: evaluate_checkpoint(cfg, _output_dir()), [*overrides, *extra], run_dir)


def transfer(overrides: Sequence[str] = (), *, ckpt: Optional[str | Path] = None, source: Optional[str] = None,
             target: Optional[str] = None, source_depth: Optional[int] = None, target_depth: Optional[int] = None,
             run_dir: Optional[str | Path] = None) -> List[Dict[str, Any]]:
    """Move a checkpoint between resolutions or depths as ``msnet transfer`` does; returns the table's rows.

    The keywords are the command's flags: ``source``/``target`` are ``--from``/``--to`` (``coarse``,
    ``fine``, a pixel size), ``source_depth``/``target_depth`` are ``--from-depth``/``--to-depth``
    (layers per stage). The transferred checkpoint is written into the run folder.
    """
    from msnet.tasks.transfer import transfer_checkpoint

    flags = {"ckpt": path_value(ckpt) if ckpt is not None else None, "source": source, "target": target,
             "source_depth": source_depth, "target_depth": target_depth}
    extra = [f"{key}={value}" for key, value in flags.items() if value is not None]
    return run_command("transfer", lambda cfg: transfer_checkpoint(cfg, _output_dir()), [*overrides, *extra], run_dir)


def path_value(path: str | Path) -> str:
    """A path as an override value: as it is when Hydra's grammar reads it so (``outputs/run-1``), else quoted."""
    text = str(path)
    return text if re.fullmatch(r"[\w./-]+", text) else quote(text)


def _output_dir() -> str:
    """The current Hydra job's run folder (set by :func:`run_command`)."""
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().runtime.output_dir)


def run_command(name: str, task: Callable[[Any], Any], overrides: Sequence[str],
                run_dir: Optional[str | Path] = None) -> Any:
    """Compose config ``name`` with ``overrides`` and run ``task(cfg)`` as one Hydra job (as Hydra's own
    run mode does: output folder, ``.hydra/``, callbacks); returns what ``task`` returns.

    Composition errors become one-line :class:`MsnetError` s; the task's own exceptions propagate.
    """
    from hydra.core.utils import JobStatus, run_job
    from hydra.types import HydraContext, RunMode
    from hydra._internal.callbacks import Callbacks

    from msnet.commands import unselected_group_line

    args = _checked(name, overrides) + ([f"hydra.run.dir={path_value(run_dir)}"] if run_dir is not None else [])
    with _own_hydra(name) as hydra, _argv([f"msnet {name}", *args]):
        try:  # Hydra's command line adds hydra.mode=RUN to a single run's overrides; so does this
            cfg = hydra.compose_config(config_name=name, overrides=[*args, "hydra.mode=RUN"], run_mode=RunMode.RUN,
                                       with_log_configuration=False)
        except Exception as err:
            raise MsnetError(unselected_group_line(err, args) or hydra_error_line(err, name)) from None
        callbacks = Callbacks(cfg)
        callbacks.on_run_start(config=cfg, config_name=name)
        ret = run_job(hydra_context=HydraContext(config_loader=hydra.config_loader, callbacks=callbacks),
                      task_function=_keeping_errors(task), config=cfg, job_dir_key="hydra.run.dir", job_subdir_key=None,
                      configure_logging=False)
        callbacks.on_run_end(config=cfg, config_name=name, job_return=ret)
    if ret.status == JobStatus.FAILED:
        raise ret._return_value  # the task's exception itself (JobReturn.return_value would print a line first)
    return ret.return_value


def _keeping_errors(task: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``task`` that, like the command line, leaves its :class:`MsnetError` in ``error.txt`` of its run folder
    (and removes one an earlier run into the same folder left)."""

    def job(cfg: Any) -> Any:
        error = Path(_output_dir()) / "error.txt"
        error.unlink(missing_ok=True)
        try:
            return task(cfg)
        except MsnetError as err:
            error.write_text(f"{err}\n")
            raise

    return job


def _checked(name: str, overrides: Sequence[str]) -> List[str]:
    """The overrides as a list of strings; a single string or a sweep flag is a mistake with a fix."""
    if isinstance(overrides, (str, bytes)) or not all(isinstance(o, str) for o in overrides):
        raise MsnetError(f"overrides are a list of strings, e.g. msnet.{name}(['model.layers=8', 'trainer.epochs=1'])")
    for flag in ("-m", "--multirun", "--cfg", "-c"):
        if flag in overrides:
            raise MsnetError(f"{flag} is a command-line flag; msnet.{name} runs one job: call it once per setting, "
                             f"or sweep from the shell: msnet {name} -m ...")
    return list(overrides)


def hydra_error_line(err: BaseException, name: str) -> str:
    """One line for a config that does not compose: the command line's own line where it has one
    (:func:`msnet.commands.type_error_line`: a wrong type, a misspelt key, an unknown option), else
    Hydra's message and the OmegaConf error behind it, joined into one line."""
    from msnet.commands import type_error_line

    line = type_error_line(err)
    if line is not None:
        return line
    text = str(err).split("Config search path:")[0]
    cause = str(err.__cause__).split("full_key:")[0] if err.__cause__ is not None else ""
    lines = [line.strip().rstrip(".") for line in (text + "\n" + cause).splitlines() if line.strip()]
    lines = [line for line in lines if not line.endswith("_schema")]  # the schemas are not choices
    out: List[str] = []
    for line in lines:  # "Available options in 'optimizer':" followed by one option a line
        if out and out[-1].endswith(":") and " " not in line:
            out[-1] += f" {line}"
        elif out and out[-1].startswith("Available options") and " " not in line:
            out[-1] += f", {line}"
        else:
            out.append(line)
    return "; ".join(out) + f" (msnet {name} --help lists the groups and options)"


@contextmanager
def _own_hydra(name: str) -> Iterator[Any]:
    """A fresh GlobalHydra over ``msnet.conf`` for one call; whatever Hydra state the caller had is put back."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from msnet.commands import register_configs  # the schemas, the optuna preset, the launcher warnings filter

    register_configs()
    saved_gh = GlobalHydra.instance().hydra
    saved_hc = HydraConfig.instance().cfg
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="msnet.conf", job_name=name, version_base="1.3"):
            yield GlobalHydra.instance().hydra
    finally:
        GlobalHydra.instance().hydra = saved_gh
        HydraConfig.instance().cfg = saved_hc


@contextmanager
def _argv(argv: List[str]) -> Iterator[None]:
    """``sys.argv`` as the dispatcher sets it for the command, for ``command.txt``; the caller's is put back."""
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved

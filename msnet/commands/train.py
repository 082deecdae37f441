"""``msnet train``: wires the composed config to :func:`msnet.training.train` and returns the objective to a sweeper."""

from pathlib import Path
from typing import Any, ContextManager, Dict, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from msnet.commands import CONFIG_PATH, check_objective, errors_as_lines
from msnet.config import Objective


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> Optional[float]:
    """Train, and return ``summary[trainer.objective]`` (what ``hydra/sweeper=optuna`` maximises or minimises).

    A job of a sweep that fails (an :class:`MsnetError`, a diverging loss, a bug) keeps its error in
    ``error.txt`` and returns the objective's worst value (-inf for an accuracy, +inf for a loss), so
    an Optuna study records the trial as the worst there is and goes on.
    """
    worst = Objective(cfg.trainer.objective).worst
    with errors_as_lines(HydraConfig.get().runtime.output_dir):
        summary = run(cfg)
        value = summary.get(str(cfg.trainer.objective)) if summary else None
        return worst if value is None else float(value)
    return worst  # reached only inside a sweep, after errors_as_lines recorded the job's failure


def run(cfg: DictConfig) -> Optional[Dict[str, Any]]:
    """One ``msnet train`` job, inside Hydra (``HydraConfig`` set): train here, or on ``trainer.devices``
    processes under torchrun; returns the run's summary. Shared by the CLI and :func:`msnet.train`.

    Raises :class:`MsnetError` for anything a person can fix. When the torchrun ranks fail they have
    printed their error already: a single run exits with their code (``SystemExit``), a sweep's job
    returns None (its ``error.txt`` marks it failed).
    """
    from msnet.tasks.launch import launch, should_launch
    from msnet.training import train

    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    overrides = list(hc.overrides.task)
    sweep = hc.mode == RunMode.MULTIRUN
    # a job of a sweep records the command that reproduces it alone, not the whole -m line
    argv = ["msnet train", *overrides] if sweep else None
    check_objective(cfg)
    if should_launch(cfg):  # trainer.devices=K: the K ranks run this command under torchrun, into run_dir
        with sweep_group_for_ranks(str(Path(hc.sweep.dir).resolve()) if sweep else None):
            code = launch(cfg, run_dir, overrides)
        if code and not sweep:  # the ranks printed the error; in a sweep their error.txt marks the job failed
            raise SystemExit(code)
        if code:
            return None
        import json

        return json.loads((Path(run_dir) / "summary.json").read_text())
    return train(cfg, run_dir, overrides=overrides, argv=argv)


def sweep_group_for_ranks(group: Optional[str]) -> ContextManager[None]:
    """While torchrun's ranks run a sweep job: ``MSNET_SWEEP_GROUP`` = the sweep folder, so that rank 0's tracker
    tags the run with its sweep as a job trained in one process does (:func:`msnet.runs.tracking.job_identity`)."""
    from msnet.runs.tracking import SWEEP_GROUP_ENV, scoped_environ

    return scoped_environ({SWEEP_GROUP_ENV: group})

"""One thin Hydra entry point per subcommand; the work lives in importable modules."""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

from msnet import MsnetError
from msnet.config import register_configs

CONFIG_PATH = "pkg://msnet.conf"
register_configs()
# conf/hydra/launcher/{joblib,submitit_slurm}.yaml deliberately replace the launcher plugins' configs
# of the same name (so `hydra/launcher=joblib` gets msnet's defaults); Hydra then checks them against
# the plugins' schemas and warns that this matching is deprecated. Each preset names its own
# _target_, so it does not depend on the matching.
warnings.filterwarnings(
    "ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema with the same name"
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


def _write_error(run_dir: Optional[str | Path], message: str) -> None:
    if run_dir is not None and Path(run_dir).is_dir():
        (Path(run_dir) / "error.txt").write_text(message + "\n")


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def seed_job(cfg: DictConfig) -> DictConfig:
    """Give job K of a ``-m`` sweep the seed ``cfg.seed + K`` (in place); a single run keeps its seed.

    Called before the config is checked and written, so ``config.yaml`` in the job's run
    directory records the seed the job used (``.hydra/overrides.yaml`` keeps the one typed).
    Swept seeds are offset too: ``-m model.layers=1,2 seed=0,1`` runs seeds 0, 2, 2, 4, still
    distinct within each group that ``msnet report --group-by model.layers`` averages over.
    """
    from hydra.core.hydra_config import HydraConfig

    if _in_sweep() and cfg.get("seed") is not None:
        with open_dict(cfg):
            cfg.seed = int(cfg.seed) + int(HydraConfig.get().job.num)
    return cfg


class SweepFailures(Callback):
    """A Hydra callback (``conf/hydra/default.yaml``): after a ``-m`` sweep, exit with code 2 if a job failed.

    Jobs may run in other processes or on other machines (joblib, SLURM), so the failures are
    read from the sweep folder: the ``error.txt`` files that :func:`errors_as_lines` wrote during
    this sweep (new, or changed since it started). Every other job's results stay in place.
    """

    def __init__(self) -> None:
        self.sweep_dir: Optional[Path] = None
        self.before: Dict[Path, float] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.before = {p: p.stat().st_mtime for p in _error_files(self.sweep_dir)}

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = self.sweep_dir or Path(str(config.hydra.sweep.dir))
        failed = [p for p in _error_files(sweep_dir) if self.before.get(p) != p.stat().st_mtime]
        if not failed:
            return
        jobs = "; ".join(f"{p} ({_last_line(p)})" for p in failed)
        print(f"error: {len(failed)} job{'s' if len(failed) > 1 else ''} of the sweep failed: {jobs}; "
              f"the other jobs' results are in {sweep_dir}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def _error_files(sweep_dir: Path) -> List[Path]:
    if not sweep_dir.is_dir():
        return []
    # job 2 before job 10
    return sorted(sweep_dir.glob("**/error.txt"), key=lambda p: [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in p.parts])


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"

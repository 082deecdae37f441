"""One thin Hydra entry point per subcommand; the work lives in importable modules."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from msnet import MsnetError
from msnet.config import register_configs

CONFIG_PATH = "pkg://msnet.conf"
register_configs()


@contextmanager
def errors_as_lines(run_dir: Optional[str | Path] = None) -> Iterator[None]:
    """Turn :class:`MsnetError` into one ``error: ...`` line on stderr and exit code 2.

    The line is also written to ``run_dir/error.txt``. Inside a ``-m`` sweep the job
    fails alone: the error is reported and the sweep goes on to the next job.
    """
    try:
        yield
    except MsnetError as err:
        message = str(err)
        print(f"error: {message}", file=sys.stderr, flush=True)
        if run_dir is not None and Path(run_dir).is_dir():
            (Path(run_dir) / "error.txt").write_text(message + "\n")
        if _in_sweep():
            return
        raise SystemExit(2) from None


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN

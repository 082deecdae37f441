"""``trainer.devices=K``: start K training processes with torchrun and wait for them.

``msnet train trainer.devices=K`` is the same as typing ``torchrun --standalone
--nproc_per_node=K -m msnet train ...``: this module builds that command line and runs
torchrun's agent in this process. The ranks themselves train through :func:`msnet.training.train`
and the in-process primitives of :mod:`msnet.training.distributed`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, List, Mapping, Optional

from msnet.errors import MsnetError
from msnet.training.distributed import DistEnv, threads_per_rank
from msnet.training.setup import check_config


def should_launch(cfg: Any, environ: Optional[Mapping[str, str]] = None) -> bool:
    """``trainer.devices > 1`` in a process torchrun did not start: :func:`launch` must start the ranks.

    Under torchrun ``trainer.devices`` must be 1 (the default) or the processes per machine.
    """
    env = os.environ if environ is None else environ
    devices = int(cfg.trainer.get("devices", 1))
    if devices < 1:
        raise MsnetError(f"trainer.devices must be at least 1, got {devices}")
    if "WORLD_SIZE" in env:
        here = int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
        if devices > 1 and devices != here:
            raise MsnetError(
                f"trainer.devices={devices} but torchrun started {here} processes here; "
                "drop trainer.devices when you start torchrun yourself"
            )
        return False
    return devices > 1


def launch_args(devices: int, overrides: List[str], run_dir: str | Path) -> List[str]:
    """torchrun's arguments to train ``overrides`` on ``devices`` local processes into ``run_dir``.

    The same as typing ``torchrun --standalone --nproc_per_node=K -m msnet train OVERRIDES hydra.run.dir=DIR``.
    """
    return ["--standalone", f"--nproc_per_node={devices}", "-m", "msnet", "train", *overrides, f"hydra.run.dir={run_dir}"]


def launch(cfg: Any, run_dir: str | Path, overrides: List[str]) -> int:
    """Run ``msnet train`` on ``trainer.devices`` processes with torchrun, wait, and return the exit code.

    The ranks train with the same ``overrides``, and rank 0 writes into ``run_dir`` (the
    directory Hydra made for this command). CPU ranks get ``OMP_NUM_THREADS`` = cores // K
    (or ``threads``). The config is checked here first (one line, before any process starts).
    torchrun's agent runs in this process with its logging muted: a rank that fails prints
    its own error (and rank 0 writes ``run_dir/error.txt``); for a failure without a line
    (a crash, a traceback) this prints one and writes it to ``error.txt``.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    devices = int(cfg.trainer.devices)
    if not cfg.get("resume"):  # a resumed config is the checkpoint's: the ranks check it
        check_config(cfg, DistEnv(world_size=devices, local_world_size=devices))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(cfg.get("threads"), devices)))
    error_file = Path(run_dir) / "error.txt"
    error_file.unlink(missing_ok=True)
    logging.disable(logging.ERROR)  # the agent's own warnings and failure report; the ranks speak for themselves
    try:
        run(parse_args(launch_args(devices, overrides, run_dir)))
        return 0
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode
    finally:
        logging.disable(logging.NOTSET)
    if not error_file.exists():
        message = f"rank {rank} of {devices} exited with code {code} (its output is above); the run is in {run_dir}"
        print(f"error: {message}", file=sys.stderr, flush=True)
        error_file.write_text(message + "\n")
    return code if code > 0 else 1

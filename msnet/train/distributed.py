"""Data-parallel training on K processes (``torchrun``) with DistributedDataParallel.

How a K-process run divides the work, and why it equals one process with the same batch:

- **Ranks** come from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``; :func:`detect`). The process group
  uses ``nccl`` when the run's device is CUDA (rank r on ``cuda:LOCAL_RANK``) and ``gloo`` on
  the CPU, where each rank takes ``max(1, cores // LOCAL_WORLD_SIZE)`` threads unless
  ``threads`` is set (:func:`setup`).
- **Data.** Every rank holds the whole in-memory dataset (these datasets are small) and draws
  the same shuffled order of global batches (the data generator is seeded with ``seed`` on
  every rank). Rank r takes the contiguous slice ``[floor(r n / K), floor((r+1) n / K))`` of
  each global batch of n images (:class:`Shard`). Its data loss is its slice's mean
  cross-entropy times ``w_r = K n_r / n``; DDP averages the K gradients, so the result is
  ``sum_r (n_r / n) grad mean_r = grad`` of the global batch's mean loss, also when K does not
  divide n (a rank with an empty slice contributes zero). The regulariser is added unweighted
  on every rank, so its gradient survives the average unchanged.
- **Model.** :func:`wrap` puts ``torch.nn.parallel.DistributedDataParallel`` around the network
  the update rule calls; the plain :class:`~msnet.core.ODEResNet` stays what the trainer reads
  (spec, depth, stages, checkpoints). Pyramid and depth schedules change parameter shapes, so
  the wrapper is rebuilt at every level. DDP broadcasts rank 0's weights when it is built.
  Reversible backprop (a custom autograd Function) hands every parameter its gradient like
  ordinary backprop, so DDP needs ``find_unused_parameters`` only with stochastic depth, whose
  dropped steps leave parameters unused on some ranks.
- **Randomness.** The global torch RNG (stochastic-depth gates) is seeded ``seed + rank``
  (:func:`seed_rank`); rank 0 keeps the stream a single process has.
- **Metrics.** Epoch loss/accuracy sums are all-reduced (:meth:`Shard.sum`), so every rank sees
  the global numbers at each read-back (and all of them stop together on a non-finite loss).
  Validation and test are evaluated identically on every rank (same weights, whole split):
  no communication, and each rank spends on it what a single process does.
- **Files.** Only rank 0 writes the run directory, checkpoints and console; ranks > 0 print
  nothing and write into a temporary directory removed at the end (:func:`rank_run_dir`).
- **Update rules.** Only first-order ``torch.optim`` steps are data-parallel; whole-step rules
  of :data:`~msnet.train.updates.UPDATE_RULES` (``bcd``, ``mgopt``) stop with one line
  (:func:`check`).

``msnet train trainer.devices=K`` starts ``torchrun`` itself (:func:`launch`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from msnet import MsnetError

_OWNED_GROUP = False  # whether setup() (not the caller) initialised the process group


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a data-parallel run (``world_size`` 1: a plain run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        """More than one process trains this network."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0


def detect(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """The rank and world size from torchrun's environment variables (one process when they are absent)."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    return DistEnv(int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0")), local_world)


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(threads: Optional[int], ranks_here: int) -> int:
    """Torch CPU threads for each of ``ranks_here`` processes on one machine: ``threads`` if set, else cores // ranks."""
    return int(threads) if threads else max(1, cpu_cores() // max(1, ranks_here))


def check(cfg: Any, env: DistEnv) -> None:
    """Fail with one line if the config cannot train data-parallel (before data is loaded)."""
    if not env.enabled:
        return
    from msnet.train.updates import whole_step_rule

    rule = whole_step_rule(cfg)
    if rule is not None:
        key, name = rule
        raise MsnetError(
            f"{key}={name} does not run data-parallel ({env.world_size} processes); train it in one process "
            "(trainer.devices=1, no torchrun) or use a first-order optimizer (optimizer=adam|adamw|sgd)"
        )
    if str(cfg.device).startswith("cuda:"):
        raise MsnetError(
            f"device={cfg.device} pins every rank to one GPU; use device=cuda or device=auto "
            "(rank r then takes cuda:LOCAL_RANK; choose GPUs with CUDA_VISIBLE_DEVICES)"
        )


def setup(env: DistEnv, device: torch.device, threads: Optional[int] = None) -> torch.device:
    """Join the process group (once) and return this rank's device; a no-op for one process.

    CUDA: ``nccl`` and ``cuda:LOCAL_RANK``. CPU: ``gloo``, and ``threads_per_rank`` torch threads.
    """
    global _OWNED_GROUP
    if not env.enabled:
        return device
    if device.type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise MsnetError(
                f"rank {env.rank} needs cuda:{env.local_rank} but {torch.cuda.device_count()} GPUs are visible; "
                "start at most one process per GPU (trainer.devices / --nproc_per_node)"
            )
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(threads_per_rank(threads, env.local_world_size))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=env.rank, world_size=env.world_size)
        _OWNED_GROUP = True
    return device


def cleanup() -> None:
    """Leave the process group if :func:`setup` joined it."""
    global _OWNED_GROUP
    if _OWNED_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED_GROUP = False


def seed_rank(seed: int, env: DistEnv) -> None:
    """Seed the global torch RNG (stochastic-depth gates) with ``seed + rank``; rank 0 keeps its stream.

    Called once the model is built (so every rank builds the same weights) and after a resume
    restored rank 0's saved RNG state on every rank.
    """
    if env.rank > 0:
        torch.manual_seed(seed + env.rank)


def wrap(module: nn.Module, env: DistEnv, device: torch.device, find_unused: bool = False) -> nn.Module:
    """``module`` in DistributedDataParallel (one GPU per rank, or the CPU); unchanged for one process."""
    if not env.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)


@dataclass(frozen=True)
class Shard:
    """Rank ``rank``'s contiguous share of each global batch, and the all-reduce of sums."""

    rank: int
    world_size: int

    def bounds(self, n: int) -> Tuple[int, int]:
        """``[start, stop)`` of this rank's slice of a global batch of ``n`` (sizes differ by at most one)."""
        return self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size

    def split(self, xb: torch.Tensor, yb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's images ``(n_r, C, H, W)``, labels ``(n_r,)`` and loss weight ``K n_r / n``."""
        start, stop = self.bounds(yb.shape[0])
        return xb[start:stop], yb[start:stop], self.world_size * (stop - start) / yb.shape[0]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over all ranks (in place, on any device the backend serves)."""
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values


def shard(env: DistEnv) -> Optional[Shard]:
    """The :class:`Shard` of this rank, or None for one process."""
    return Shard(env.rank, env.world_size) if env.enabled else None


@contextlib.contextmanager
def rank_run_dir(run_dir: str | Path, env: DistEnv) -> Iterator[Path]:
    """``run_dir`` on rank 0; a temporary directory, removed at the end, on ranks > 0."""
    if env.is_main:
        yield Path(run_dir)
        return
    with tempfile.TemporaryDirectory(prefix=f"msnet-rank{env.rank}-") as tmp:
        yield Path(tmp)


# ---------------------------------------------------------------- launching torchrun from `msnet train`


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
        from msnet.train import speed
        from msnet.train.setup import check_config

        check_config(cfg)
        check(cfg, DistEnv(world_size=devices, local_world_size=devices))
        speed.check(cfg)
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

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
  (:func:`seed_rank`); rank 0 keeps the stream a single process has. Checkpoints keep every rank's
  state (:func:`gather_rng`), so a resume gives each rank its own stream back.
- **Metrics.** Epoch loss/accuracy sums are all-reduced (:meth:`Shard.sum`), so every rank sees
  the global numbers at each read-back (and all of them stop together on a non-finite loss).
  Validation and test are evaluated identically on every rank (same weights, whole split):
  no communication, and each rank spends on it what a single process does.
- **Files.** Only rank 0 writes the run directory, checkpoints and console; ranks > 0 print
  nothing and write into a temporary directory removed at the end (:func:`rank_run_dir`).
- **Update rules.** Only rules whose class says ``data_parallel`` (first-order ``torch.optim``
  steps) run on K processes; the others (``bcd``, ``mgopt``) stop with one line (:func:`check`).

``msnet train trainer.devices=K`` starts ``torchrun`` itself (:func:`msnet.tasks.launch.launch`).
This module imports nothing from the rest of ``msnet.training``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from msnet.errors import MsnetError

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


def check(cfg: Any, env: DistEnv, rule: Any) -> None:
    """Fail with one line if the config cannot train data-parallel (before data is loaded).

    ``rule``: the update-rule class the config selects (its ``data_parallel`` fact decides)."""
    if not env.enabled:
        return
    if not rule.data_parallel:
        raise MsnetError(
            f"{rule.selected_by}={cfg[rule.selected_by].name} does not run data-parallel ({env.world_size} processes); "
            "train it in one process (trainer.devices=1, no torchrun) or use a first-order optimizer "
            "(optimizer=adam|adamw|sgd)"
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


def seed_rank(seed: int, env: DistEnv, saved: Optional[Sequence[Mapping[str, Any]]] = None) -> None:
    """Seed the global torch RNG (stochastic-depth gates) with ``seed + rank``; rank 0 keeps its stream.

    Called once the model is built (so every rank builds the same weights) and after a resume
    restored rank 0's saved RNG state on every rank. ``saved``: a resumed checkpoint's per-rank
    states (:func:`gather_rng`); rank r > 0 takes its own back instead of starting ``seed + r`` again.
    """
    if env.rank == 0:
        return
    if saved is not None and env.rank < len(saved):
        torch.set_rng_state(saved[env.rank]["torch"])
        if "cuda" in saved[env.rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved[env.rank]["cuda"])
    else:
        torch.manual_seed(seed + env.rank)


def gather_rng(env: DistEnv) -> Optional[List[Dict[str, Any]]]:
    """Every rank's global torch (and CUDA) RNG state, in rank order, on every rank; None for one process.

    A collective: every rank calls it at the same point. A checkpoint keeps the list
    (``rng["ranks"]``) so that :func:`seed_rank` gives each rank its stream back on a resume.
    """
    if not env.enabled:
        return None
    mine: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state_all()
    states: List[Any] = [None] * env.world_size
    dist.all_gather_object(states, mine)
    return states


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

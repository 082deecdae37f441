"""The inner loops: one training epoch and one evaluation pass, on in-memory tensors."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from msnet.errors import MsnetError
from msnet.data import batches, num_batches
from msnet.methods.first_order import FirstOrder
from msnet.methods.base import UpdateRule

if TYPE_CHECKING:
    from msnet.training.distributed import Shard


class NonFiniteLoss(MsnetError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochResult:
    """Mean training loss and accuracy over the epoch's samples, wall time in seconds."""

    loss: float
    acc: float
    seconds: float
    samples: int


ProgressCallback = Callable[[int, float, float, float], None]
"""``cb(batches_done, mean_loss, mean_acc, images_per_second)``, called every ``log_every`` batches."""


def train_epoch(
    model: nn.Module,
    update: UpdateRule | torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    grad_clip: Optional[float] = None,
    log_every: int = 25,
    on_progress: Optional[ProgressCallback] = None,
    epoch: int = 0,
    penalty: Optional[Callable[[], torch.Tensor]] = None,
    on_step: Optional[Callable[[Dict[str, Any]], None]] = None,
    shard: Optional["Shard"] = None,
    after_update: Optional[Callable[[], None]] = None,
) -> EpochResult:
    """One pass over ``(x, y)`` in shuffled mini-batches, each handed to ``update``.

    ``update`` is an :class:`~msnet.methods.base.UpdateRule`, or a ``torch.optim``
    optimiser, which is wrapped in :class:`~msnet.methods.first_order.FirstOrder` with
    ``grad_clip`` and ``penalty`` (a regulariser added to the objective; the reported
    loss is the data loss alone). Running sums stay on the device and are read back only
    every ``log_every`` batches (and at the end), so the loop adds no host
    synchronisation per batch. Raises :class:`NonFiniteLoss` as soon as a read-back finds
    NaN or inf. ``on_step(info)`` receives each step's diagnostics, for rules that have them.

    ``shard`` (data-parallel runs, :class:`msnet.training.distributed.Shard`): every rank draws the
    same global batches, steps on its own slice with the loss weight that makes DDP's averaged
    gradient the global batch's, and the running sums are all-reduced at each read-back, so
    the numbers reported (and the non-finite check) are the global ones on every rank.

    ``after_update()`` runs after every update (a projection of the weights, e.g. the network's
    :meth:`~msnet.core.network.ODEResNet.bound_steps_` for ``model.step_bound``).
    """
    if isinstance(update, torch.optim.Optimizer):
        update = FirstOrder(model, update, grad_clip=grad_clip, penalty=penalty)
    elif grad_clip is not None or penalty is not None:
        raise TypeError("grad_clip and penalty belong to the update rule when one is passed")
    model.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    seen = 0
    total = num_batches(x.shape[0], batch_size)
    for i, (xb, yb) in enumerate(batches(x, y, batch_size, generator, shuffle=True), start=1):
        if shard is not None:
            xb, yb, update.loss_weight = shard.split(xb, yb)
        out = update.step(xb, yb)
        if after_update is not None:
            after_update()
        loss_sum += out.loss * yb.shape[0]
        correct += (out.logits.argmax(1) == yb).sum()
        seen += yb.shape[0]
        if out.info is not None and on_step is not None:
            on_step({"epoch": epoch, "batch": i, **out.info})
        if i % log_every == 0 or i == total:
            totals = [loss_sum.item(), correct.item(), seen]
            if shard is not None:
                totals = shard.sum(torch.tensor(totals, dtype=torch.float64, device=loss_sum.device)).tolist()
            mean_loss = totals[0] / totals[2]
            if not torch.isfinite(torch.tensor(mean_loss)):
                raise NonFiniteLoss(f"the training loss became {mean_loss} in epoch {epoch}, batch {i}")
            if on_progress is not None:
                on_progress(i, mean_loss, totals[1] / totals[2], totals[2] / (time.perf_counter() - start))
    return EpochResult(totals[0] / totals[2], totals[1] / totals[2], time.perf_counter() - start, int(totals[2]))

"""Update rules: how one mini-batch changes the weights.

The epoch loop (:func:`msnet.training.loop.train_epoch`) knows nothing about optimisers:
it hands each mini-batch to an :class:`UpdateRule` and reads back the batch loss and
logits. A first-order optimiser from :data:`msnet.methods.first_order.OPTIMIZERS` becomes a
:class:`~msnet.methods.first_order.FirstOrder` rule; methods that need the model, not just its gradient
(block-coordinate descent, multilevel minimisation), register their class in
:data:`UPDATE_RULES` under the name a user selects with the key the class names
(``selected_by``: ``optimizer.name`` or ``trainer.name``).

Each rule class carries its facts, so the checks before a run (:mod:`msnet.training.setup`),
data-parallel training and the GPU speed options ask the rule instead of re-deriving them:
``selected_by``, ``data_parallel`` (runs under torchrun), ``speed_options`` (autocast,
``torch.compile``, channels-last apply), and :meth:`UpdateRule.check` (its settings' ranges,
checked before data is loaded).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Optional

import torch
import torch.nn as nn

from msnet.registry import Registry

Penalty = Callable[[], torch.Tensor]


@dataclass
class StepOutput:
    """What one update reports about its mini-batch.

    ``loss``: detached scalar, the data loss (no regulariser) at the weights *before* the
    update; ``logits``: detached ``(B, classes)`` from that same forward pass;
    ``info``: per-iteration diagnostics (CG iterations, step length, work ...) that the
    trainer appends to ``steps.jsonl``, or None for rules that have none.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    info: Optional[Dict[str, float]] = None


class UpdateRule(abc.ABC):
    """One training step on a mini-batch ``(xb, yb)`` of images ``(B, C, H, W)`` and labels ``(B,)``."""

    selected_by: ClassVar[str] = "optimizer"
    """The config key whose ``name`` selects the rule: ``optimizer`` or ``trainer``."""
    data_parallel: ClassVar[bool] = False
    """Whether it trains under torchrun (``trainer.devices > 1``); else preflight refuses that in one line."""
    speed_options: ClassVar[bool] = False
    """Whether ``trainer.precision``, ``trainer.compile`` and ``trainer.channels_last`` apply to it."""

    @classmethod
    @abc.abstractmethod
    def from_config(cls, model: nn.Module, cfg: Any, opt_cfg: Any, epochs: int,
                    penalty: Optional["Penalty"]) -> "UpdateRule":
        """The rule for ``model``: ``cfg`` is the whole train config, ``opt_cfg`` the level's optimiser config
        (its lr may differ from ``cfg.optimizer.lr``), ``epochs`` the level's epochs (for schedules)."""

    @classmethod
    def check(cls, cfg: Any) -> None:
        """Fail with one :class:`MsnetError` line if ``cfg`` asks this rule for something it cannot do.

        Runs before data is loaded; the default checks nothing beyond what the schema types."""

    @abc.abstractmethod
    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> StepOutput:
        """Change the weights using this batch and report the batch's loss before the change."""

    def end_epoch(self) -> None:
        """Called after every epoch (learning-rate schedules)."""

    @property
    def lr(self) -> Optional[float]:
        """The current step size, for the epoch record (None where a rule has none)."""
        return None

    def epoch_stats(self) -> Dict[str, Any]:
        """Extra keys for the epoch record in ``metrics.jsonl`` (e.g. cumulative work); empty by default."""
        return {}

    @abc.abstractmethod
    def state_dict(self) -> Dict[str, Any]:
        """The rule's state, stored in checkpoints under the keys returned (``optimizer``, ``scheduler``)."""

    @abc.abstractmethod
    def load_state_dict(self, ckpt: Dict[str, Any]) -> None:
        """Restore from a checkpoint holding what :meth:`state_dict` returned."""


UPDATE_RULES: Registry[type[UpdateRule]] = Registry("update rule")
"""Whole-step rules by the name a user selects them with (``optimizer=bcd``, ``trainer=mgopt``)."""

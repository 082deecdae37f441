"""Update rules: how one mini-batch changes the weights.

The epoch loop (:func:`msnet.training.loop.train_epoch`) knows nothing about optimisers:
it hands each mini-batch to an :class:`UpdateRule` and reads back the batch loss and
logits. A first-order optimiser from :data:`msnet.training.optim.OPTIMIZERS` becomes a
:class:`FirstOrder` rule; methods that need the model, not just its gradient
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
import torch.nn.functional as F

from msnet.registry import Registry
from msnet.training.optim import build_optimizer, build_scheduler, check_optimizer

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


class FirstOrder(UpdateRule):
    """A ``torch.optim`` optimiser: forward, cross-entropy (+ penalty), backward, optional clipping, step.

    ``model`` is what the step calls: the network itself, or a wrapper holding its parameters
    (DDP, autocast, ``torch.compile``; :func:`msnet.training.speed.prepare_update`).
    """

    data_parallel = True
    speed_options = True

    loss_weight: float = 1.0
    """Factor on the data term of the objective (not on the penalty, not on the reported loss).
    Data-parallel training sets it per batch to ``K n_r / n`` so that DDP's mean of the K ranks'
    gradients is the gradient of the global batch's mean loss (:class:`msnet.training.distributed.Shard`)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
        grad_clip: Optional[float] = None,
        penalty: Optional[Penalty] = None,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_clip, self.penalty = grad_clip, penalty

    @classmethod
    def from_config(cls, model: nn.Module, cfg: Any, opt_cfg: Any, epochs: int,
                    penalty: Optional[Penalty]) -> "FirstOrder":
        """The ``torch.optim`` optimiser ``opt_cfg.name`` with its per-epoch schedule over ``epochs``."""
        optimizer = build_optimizer(model.parameters(), opt_cfg)
        return cls(model, optimizer, build_scheduler(optimizer, opt_cfg, max(1, epochs)), cfg.trainer.grad_clip, penalty)

    @classmethod
    def check(cls, cfg: Any) -> None:
        check_optimizer(cfg.optimizer)

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> StepOutput:
        logits = self.model(xb)
        # An empty shard (a last batch smaller than the number of ranks) still takes part in DDP's
        # gradient average, with a zero loss whose gradient reaches every parameter.
        loss = F.cross_entropy(logits, yb) if yb.numel() else logits.sum() * 0.0
        data = loss * self.loss_weight if self.loss_weight != 1.0 else loss
        self.optimizer.zero_grad(set_to_none=True)
        (data + self.penalty() if self.penalty is not None else data).backward()
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return StepOutput(loss.detach(), logits.detach())

    def end_epoch(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> Dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def load_state_dict(self, ckpt: Dict[str, Any]) -> None:
        if ckpt.get("optimizer") is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])


UPDATE_RULES: Registry[type[UpdateRule]] = Registry("update rule")
"""Whole-step rules by the name a user selects them with (``optimizer=bcd``, ``trainer=mgopt``)."""


def selected_rule(cfg: Any) -> type[UpdateRule]:
    """The rule class the config selects: a registered rule named by ``trainer.name`` (which wins) or
    ``optimizer.name`` under the key it is selected by, else :class:`FirstOrder`."""
    for key in ("trainer", "optimizer"):
        name = cfg[key].name
        if name in UPDATE_RULES and UPDATE_RULES.get(name).selected_by == key:
            return UPDATE_RULES.get(name)
    return FirstOrder


def rule_choice(cfg: Any) -> str:
    """How the config selected its rule, for messages: ``trainer=mgopt``, ``optimizer=adam``."""
    key = selected_rule(cfg).selected_by
    return f"{key}={cfg[key].name}"


def build_update(model: nn.Module, cfg: Any, opt_cfg: Any, epochs: int, penalty: Optional[Penalty]) -> UpdateRule:
    """The update rule the config selects (:func:`selected_rule`), for one level of ``epochs`` epochs."""
    return selected_rule(cfg).from_config(model, cfg, opt_cfg, epochs, penalty)

"""First-order training: the ``torch.optim`` optimisers and learning-rate schedules, looked up by name, and
:class:`FirstOrder`, the update rule every run uses unless a whole-step method is selected."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from msnet.config import Scheduler
from msnet.errors import MsnetError
from msnet.methods.base import Penalty, StepOutput, UpdateRule
from msnet.registry import Registry

OptimizerBuilder = Callable[[Iterable[torch.nn.Parameter], Any], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def sgd(params: Iterable[torch.nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    """SGD with (optionally Nesterov) momentum and L2 weight decay."""
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=bool(cfg.nesterov), weight_decay=cfg.weight_decay
    )


@OPTIMIZERS.register("adam")
def adam(params: Iterable[torch.nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    """Adam (Kingma & Ba 2015) with L2 weight decay added to the gradient."""
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(params: Iterable[torch.nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019): decoupled weight decay."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


SCHEDULERS = tuple(s.value for s in Scheduler)


def check_optimizer(cfg: Any) -> None:
    """Fail with one line for an unknown optimiser or scheduler, or a value out of range (an ``optimizer`` config)."""
    OPTIMIZERS.get(cfg.name)
    if cfg.scheduler not in SCHEDULERS:
        raise MsnetError(f"unknown optimizer.scheduler {cfg.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
    if not cfg.lr > 0:
        raise MsnetError(f"optimizer.lr must be positive, got {cfg.lr}")
    if cfg.get("weight_decay", 0.0) < 0:
        raise MsnetError(f"optimizer.weight_decay must be >= 0, got {cfg.weight_decay}")


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    """The optimiser ``cfg.name`` over ``params``."""
    check_optimizer(cfg)
    return OPTIMIZERS.get(cfg.name)(params, cfg)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Any, epochs: int
) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
    """Per-epoch LR schedule: ``constant`` (None), ``cosine`` over ``epochs``, or ``step``."""
    if cfg.scheduler == "constant":
        return None
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    raise MsnetError(f"unknown optimizer.scheduler {cfg.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")


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

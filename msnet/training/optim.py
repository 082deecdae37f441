"""Optimisers and learning-rate schedules, looked up by name."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from msnet import MsnetError
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


SCHEDULERS = ("constant", "cosine", "step")


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

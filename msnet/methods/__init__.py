"""Whole-step training methods, each a registered :class:`~msnet.methods.base.UpdateRule` carrying its facts.

Importing the package registers every rule in :data:`~msnet.methods.base.UPDATE_RULES` (as timm's
``models/__init__`` registers its models): first-order optimisers (:mod:`first_order`), the papers'
block-coordinate descent (:mod:`bcd`, with the Gauss-Newton/Newton-CG solves of :mod:`newton`), and the
multilevel-in-time methods MG/OPT (:mod:`mgopt`) and RMTR (:mod:`rmtr`) on the coarse-in-time hierarchy of
:mod:`hierarchy`, sharing the trust-region numerics of :mod:`trust_region`. The loop (:mod:`msnet.training`)
picks a rule with :func:`build_update`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

from msnet.methods import bcd, mgopt, rmtr  # noqa: F401  each registers its rule
from msnet.methods.base import UPDATE_RULES, Penalty, StepOutput, UpdateRule
from msnet.methods.first_order import OPTIMIZERS, FirstOrder, build_optimizer, build_scheduler, check_optimizer

__all__ = [
    "OPTIMIZERS", "UPDATE_RULES", "FirstOrder", "Penalty", "StepOutput", "UpdateRule", "build_optimizer",
    "build_scheduler", "build_update", "check_optimizer", "rule_choice", "selected_rule",
]


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

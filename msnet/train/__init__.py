"""Training: the single-level fit loop, update rules, optimisers, schedules."""

from msnet.train.api import train
from msnet.train.loop import evaluate, train_epoch
from msnet.train.optim import OPTIMIZERS, build_optimizer
from msnet.train.updates import UPDATE_RULES, FirstOrder, StepOutput, UpdateRule, build_update

__all__ = [
    "OPTIMIZERS", "UPDATE_RULES", "FirstOrder", "StepOutput", "UpdateRule", "build_optimizer", "build_update",
    "evaluate", "train", "train_epoch",
]

"""Training: the single-level fit loop, optimisers, schedules."""

from msnet.train.api import train
from msnet.train.loop import evaluate, train_epoch
from msnet.train.optim import OPTIMIZERS, build_optimizer

__all__ = ["OPTIMIZERS", "build_optimizer", "evaluate", "train", "train_epoch"]

"""Training: the single-level fit loop, update rules, optimisers, schedules."""

from msnet.train.api import train
from msnet.train.loop import evaluate, train_epoch
from msnet.train.optim import OPTIMIZERS, build_optimizer
from msnet.train.updates import UPDATE_RULES, FirstOrder, StepOutput, UpdateRule, build_update
from msnet.train import bcd as _bcd  # noqa: F401,E402  registers optimizer=bcd
from msnet.train import mgopt as _mgopt  # noqa: F401,E402  registers trainer=mgopt
from msnet.train import rmtr as _rmtr  # noqa: F401,E402  registers trainer=rmtr

__all__ = [
    "OPTIMIZERS", "UPDATE_RULES", "FirstOrder", "StepOutput", "UpdateRule", "build_optimizer", "build_update",
    "evaluate", "train", "train_epoch",
]

"""Training: the single-level fit loop, update rules, optimisers, schedules."""

from msnet.training.api import train
from msnet.training.loop import evaluate, train_epoch
from msnet.training.optim import OPTIMIZERS, build_optimizer
from msnet.training.updates import UPDATE_RULES, FirstOrder, StepOutput, UpdateRule, build_update
from msnet.training import bcd as _bcd  # noqa: F401,E402  registers optimizer=bcd
from msnet.training import mgopt as _mgopt  # noqa: F401,E402  registers trainer=mgopt
from msnet.training import rmtr as _rmtr  # noqa: F401,E402  registers trainer=rmtr

__all__ = [
    "OPTIMIZERS", "UPDATE_RULES", "FirstOrder", "StepOutput", "UpdateRule", "build_optimizer", "build_update",
    "evaluate", "train", "train_epoch",
]

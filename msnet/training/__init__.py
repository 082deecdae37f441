"""Training: the loop only (preflight, run state, schedules, the level loop, one epoch, DDP, speed options).

The methods it trains with live in :mod:`msnet.methods`. Nothing is imported eagerly, so that importing a
module of this package (``msnet.training.loop`` for ``msnet evaluate``) loads neither the trainer nor any method;
``from msnet.training import train`` loads the trainer when it is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"train": "msnet.training.api", "evaluate": "msnet.training.evaluation", "train_epoch": "msnet.training.loop"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'msnet.training' has no attribute {name!r}")

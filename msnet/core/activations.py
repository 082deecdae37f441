"""Activation functions sigma(.) of the residual functions, looked up by name."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from msnet.registry import Registry

Activation = Callable[[torch.Tensor], torch.Tensor]

ACTIVATIONS: Registry[Activation] = Registry("activation")
ACTIVATIONS.register("tanh")(torch.tanh)
ACTIVATIONS.register("relu")(F.relu)
ACTIVATIONS.register("softplus")(F.softplus)
ACTIVATIONS.register("sigmoid")(torch.sigmoid)
ACTIVATIONS.register("leaky_relu")(F.leaky_relu)


@ACTIVATIONS.register("identity")
def identity(x: torch.Tensor) -> torch.Tensor:
    """sigma(x) = x: turns the ODE into a linear one (used by the convergence-order tests)."""
    return x

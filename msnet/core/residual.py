"""Residual functions F(y; theta_j): the right-hand side of dy/dt = F(y; theta(t)).

A residual function owns no parameters. It declares the shape of the
parameters one time step needs (:meth:`AbstractResidual.shapes`), initialises
them, and evaluates F at one step's parameters. The ODE block keeps the
parameters of all N steps stacked along a leading time axis, so schedules can
read and write them as whole per-step tensors (``K: (N, C, C, 3, 3)``).
"""

from __future__ import annotations

import math
from typing import ClassVar, Dict, Tuple

import torch
import torch.nn.functional as F

from msnet.core.activations import ACTIVATIONS
from msnet.registry import Registry

Params = Dict[str, torch.Tensor]


class AbstractResidual:
    """F(y; theta) for states ``y`` of shape ``(B, C, H, W)``; ``theta`` holds one step's tensors."""

    name: ClassVar[str]

    def __init__(self, channels: int, activation: str = "tanh"):
        self.channels = channels
        self.activation_name = activation
        self.activation = ACTIVATIONS.get(activation)

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Shape of each parameter for ONE time step (the block adds the leading N axis)."""
        raise NotImplementedError

    def init_(self, params: Params) -> None:
        """Initialise stacked per-step parameters ``(N, *shape)`` in place."""
        raise NotImplementedError

    def __call__(self, y: torch.Tensor, theta: Params) -> torch.Tensor:
        raise NotImplementedError


RESIDUALS: Registry[type[AbstractResidual]] = Registry("residual function")


@RESIDUALS.register("conv_act")
class ConvAct(AbstractResidual):
    """F(y) = sigma(K(s) y + b), a 3x3 convolution with stencil s, bias b and activation sigma.

    Haber, Ruthotto, Holtham, Jun, "Learning across scales", AAAI 2018, eq. (2);
    Haber & Ruthotto, "Stable architectures for deep neural networks", 2017.
    Parameters per step: ``K (C, C, 3, 3)`` (stencils, zero boundary), ``b (C,)``.
    """

    name = "conv_act"

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        c = self.channels
        return {"K": (c, c, 3, 3), "b": (c,)}

    def init_(self, params: Params) -> None:
        # PyTorch's default conv scale, 1/sqrt(fan_in), independently for every step.
        bound = 1.0 / math.sqrt(9 * self.channels)
        with torch.no_grad():
            params["K"].uniform_(-bound, bound)
            params["b"].zero_()

    def __call__(self, y: torch.Tensor, theta: Params) -> torch.Tensor:
        return self.activation(F.conv2d(y, theta["K"], theta["b"], padding=1))

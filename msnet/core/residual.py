"""Residual functions F(y; theta_j): the right-hand side of dy/dt = F(y; theta(t)).

A residual function owns no parameters. It declares the shape of the
parameters one time step needs (:meth:`AbstractResidual.shapes`), initialises
them, and evaluates F at one step's parameters. The ODE block keeps the
parameters of all N steps stacked along a leading time axis, so schedules can
read and write them as whole per-step tensors (``K: (N, C, C, 3, 3)``).
"""

from __future__ import annotations

import abc

import math
from enum import Enum
from typing import ClassVar, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from msnet import MsnetError
from msnet.core.activations import ACTIVATIONS
from msnet.registry import Registry

Params = Dict[str, torch.Tensor]


class Spectrum(str, Enum):
    """Where the eigenvalues of a residual's Jacobian J = dF/dy lie by construction (activations with 0 <= sigma' <= 1).

    Which spectrum a scheme is stable on is the integrator's fact (``stable_for``): the
    two-step midpoint rule and symplectic Euler need ``imaginary``, leapfrog for Y'' = F(Y)
    needs ``nonpositive``, and no scheme is stable on every ``general`` field.
    """

    general = "general"  # no structure: real parts of either sign (conv_act, the pre-activation blocks)
    imaginary = "imaginary"  # purely imaginary eigenvalues: J similar to an antisymmetric matrix (or a limit of such)
    nonpositive = "nonpositive"  # real eigenvalues <= 0: J symmetric negative semi-definite (-K^T D K)


class AbstractResidual(abc.ABC):
    """F(y; theta) for states ``y`` of shape ``(B, C, H, W)``; ``theta`` holds one step's tensors.

    Facts a subclass declares: ``name``; ``parts`` (the named parts of a partitioned field that
    a scheme may evaluate alone, e.g. ``("y", "z")`` for the Hamiltonian; empty for a whole
    field) and ``channel_multiple`` (the channel count must be a multiple of it); ``spectrum``
    (:class:`Spectrum`, where J's eigenvalues lie); ``kernels`` (the stencils that set the size
    of J) and ``kernel_degree`` (:meth:`spectral_bounds` is homogeneous of that degree in them,
    so scaling every kernel by s^(1/degree) scales the bound by s).
    """

    name: ClassVar[str]
    parts: ClassVar[Tuple[str, ...]] = ()
    channel_multiple: ClassVar[int] = 1
    spectrum: ClassVar[Spectrum] = Spectrum.general
    kernels: ClassVar[Tuple[str, ...]] = ()
    kernel_degree: ClassVar[int] = 1

    def __init__(self, channels: int, activation: str = "tanh"):
        self.channels = channels
        self.activation_name = activation
        self.activation = ACTIVATIONS.get(activation)

    @abc.abstractmethod
    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Shape of each parameter for ONE time step (the block adds the leading N axis)."""

    @abc.abstractmethod
    def init_(self, params: Params) -> None:
        """Initialise stacked per-step parameters ``(N, *shape)`` in place."""

    @abc.abstractmethod
    def __call__(self, y: torch.Tensor, theta: Params) -> torch.Tensor:
        """F(y; theta), the same shape as ``y``."""

    def part(self, name: str, y: torch.Tensor, theta: Params) -> torch.Tensor:
        """The part ``name`` (one of :attr:`parts`) of F at ``y``; residuals without parts have none."""
        raise MsnetError(f"residual {self.name!r} has no part {name!r} (its parts: {list(self.parts)})")

    def spectral_bounds(self, params: Params, memory: Optional[Dict[str, torch.Tensor]] = None) -> Optional[torch.Tensor]:
        """rho_j, a bound on the spectral radius of J at every state, for each step of stacked ``(N, *shape)``
        parameters: ``(N,)``, float64. None for residuals without one (the ``general`` ones).

        Built from operator norms of the stencils (:func:`conv_norm`, an estimate from below that
        is within a few per cent), so it holds for every state because 0 <= sigma' <= 1. ``memory``:
        passed to :func:`conv_norm` (warm-started power iterations, one vector per stencil name).
        """
        return None


def conv_norm(K: torch.Tensor, size: int = 16, iters: int = 30, memory: Optional[Dict[str, torch.Tensor]] = None,
              key: str = "K", warm_iters: int = 2) -> torch.Tensor:
    """Operator 2-norms ``(N,)`` of N 3x3 convolutions with zero boundary, stencils ``K (N, C_out, C_in, 3, 3)``.

    Power iteration on K^T K over a ``size`` x ``size`` grid (all N at once, as one grouped
    convolution), float64, from a fixed start vector: deterministic, and the global RNG is
    not touched. The norm on any grid is at most the supremum over frequencies of the
    stencil's symbol, which the grid's norm approaches as the grid grows; 16 x 16 with 30
    iterations comes within 2-3 % of it for msnet's initial stencils (1.14 against 1.17
    at 24 channels), from below.

    ``memory`` (a dict, e.g. one a network keeps across training steps): the last iterate is stored
    there under ``key``, and a later call whose stencils have the same shape starts from it: at least
    ``warm_iters`` iterations, then on until no estimate moves by more than 1e-3 of itself (at most
    ``iters``). Stencils that change a little per optimizer step so keep an estimate as close as a cold
    start's at a fraction of its cost, and a large change costs more iterations, not accuracy (Miyato et al.,
    "Spectral normalization for GANs", ICLR 2018, track the top singular vector the same way).
    """
    n, c_out, c_in = K.shape[:3]
    W = K.detach().to(torch.float64).reshape(n * c_out, c_in, 3, 3)
    last = None if memory is None else memory.get(key)
    warm = last is not None and last.shape == (1, n * c_in, size, size) and last.device == W.device
    if warm:
        x = last
    else:
        g = torch.Generator(device=W.device).manual_seed(0)
        x = torch.randn(1, n * c_in, size, size, generator=g, dtype=W.dtype, device=W.device)
    norms = None
    for i in range(iters):
        x = x / x.reshape(n, -1).norm(dim=1).clamp_min(1e-300).repeat_interleave(c_in)[None, :, None, None]
        y = F.conv2d(x, W, padding=1, groups=n)
        x = F.conv_transpose2d(y, W, padding=1, groups=n)
        before, norms = norms, y.reshape(n, -1).norm(dim=1)
        if warm and before is not None and i + 1 >= warm_iters and bool(((norms - before).abs() <= 1e-3 * norms).all()):
            break
    if memory is not None:
        memory[key] = x
    return norms


RESIDUALS: Registry[type[AbstractResidual]] = Registry("residual function")


def stencil_and_bias(channels: int) -> Dict[str, Tuple[int, ...]]:
    """The per-step shapes of a field with one C x C 3x3 stencil and a bias: ``K (C, C, 3, 3)``, ``b (C,)``
    (``conv_act``, ``conv_sym``, ``conv_antisym``)."""
    return {"K": (channels, channels, 3, 3), "b": (channels,)}


def init_stencil_and_bias_(params: Params, channels: int) -> None:
    """K ~ U(-1/sqrt(9C), 1/sqrt(9C)) (PyTorch's default conv scale, 1/sqrt(fan_in)) independently for
    every step, b = 0; the block then scales each step to its step-size condition where one applies."""
    bound = 1.0 / math.sqrt(9 * channels)
    with torch.no_grad():
        params["K"].uniform_(-bound, bound)
        params["b"].zero_()


@RESIDUALS.register("conv_act")
class ConvAct(AbstractResidual):
    """F(y) = sigma(K(s) y + b), a 3x3 convolution with stencil s, bias b and activation sigma.

    Haber, Ruthotto, Holtham, Jun, "Learning across scales", AAAI 2018, eq. (2);
    Haber & Ruthotto, "Stable architectures for deep neural networks", 2017.
    Parameters per step: ``K (C, C, 3, 3)`` (stencils, zero boundary), ``b (C,)``.
    """

    name = "conv_act"

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return stencil_and_bias(self.channels)

    def init_(self, params: Params) -> None:
        init_stencil_and_bias_(params, self.channels)

    def __call__(self, y: torch.Tensor, theta: Params) -> torch.Tensor:
        return self.activation(F.conv2d(y, theta["K"], theta["b"], padding=1))


def _uniform_fan_in_(weight: torch.Tensor) -> None:
    """PyTorch's default conv scale U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for stacked ``(N, out, in, kh, kw)``."""
    fan_in = weight.shape[2] * weight.shape[3] * weight.shape[4]
    bound = 1.0 / math.sqrt(fan_in)
    weight.uniform_(-bound, bound)


@RESIDUALS.register("preact_basic")
class PreActBasic(AbstractResidual):
    """F(y) = K2 sigma(K1 sigma(y) + b1) + b2: the pre-activation basic block, two 3x3 convolutions.

    He, Zhang, Ren, Sun, "Identity mappings in deep residual networks", ECCV 2016,
    Fig. 4(e) without batch normalisation (msnet's networks are normalisation-free);
    the residual function of Lu et al. 2018's LM-ResNet on CIFAR.
    Parameters per step: ``K1, K2 (C, C, 3, 3)`` (stencils, zero boundary), ``b1, b2 (C,)``.
    """

    name = "preact_basic"

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        c = self.channels
        return {"K1": (c, c, 3, 3), "b1": (c,), "K2": (c, c, 3, 3), "b2": (c,)}

    def init_(self, params: Params) -> None:
        # PyTorch's default conv scale, independently for every step; zero biases.
        with torch.no_grad():
            _uniform_fan_in_(params["K1"])
            _uniform_fan_in_(params["K2"])
            params["b1"].zero_()
            params["b2"].zero_()

    def __call__(self, y: torch.Tensor, theta: Params) -> torch.Tensor:
        z = F.conv2d(self.activation(y), theta["K1"], theta["b1"], padding=1)
        return F.conv2d(self.activation(z), theta["K2"], theta["b2"], padding=1)


@RESIDUALS.register("preact_bottleneck")
class PreActBottleneck(AbstractResidual):
    """F(y) = W3 sigma(K2 sigma(W1 sigma(y) + b1) + b2) + b3: the pre-activation bottleneck block.

    He, Zhang, Ren, Sun, "Identity mappings in deep residual networks", ECCV 2016
    (bottleneck of He et al. 2016 "Deep residual learning", Fig. 5, in pre-activation
    order), without batch normalisation. A 1x1 convolution reduces C channels to
    m = max(1, C // 4), a 3x3 convolution acts on m channels, a 1x1 convolution expands
    back to C (the state keeps C channels, so C plays the role of 4 x planes).
    Parameters per step: ``W1 (m, C, 1, 1)``, ``b1 (m,)``, ``K2 (m, m, 3, 3)``, ``b2 (m,)``,
    ``W3 (C, m, 1, 1)``, ``b3 (C,)``.
    """

    name = "preact_bottleneck"
    expansion: ClassVar[int] = 4

    @property
    def width(self) -> int:
        """Channels m of the bottleneck, max(1, C // 4)."""
        return max(1, self.channels // self.expansion)

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        c, m = self.channels, self.width
        return {
            "W1": (m, c, 1, 1), "b1": (m,),
            "K2": (m, m, 3, 3), "b2": (m,),
            "W3": (c, m, 1, 1), "b3": (c,),
        }

    def init_(self, params: Params) -> None:
        with torch.no_grad():
            for name in ("W1", "K2", "W3"):
                _uniform_fan_in_(params[name])
            for name in ("b1", "b2", "b3"):
                params[name].zero_()

    def __call__(self, y: torch.Tensor, theta: Params) -> torch.Tensor:
        z = F.conv2d(self.activation(y), theta["W1"], theta["b1"])
        z = F.conv2d(self.activation(z), theta["K2"], theta["b2"], padding=1)
        return F.conv2d(self.activation(z), theta["W3"], theta["b3"])

"""Residual functions F(y; theta_j): the right-hand side of dy/dt = F(y; theta(t)).

A residual function owns no parameters. It declares the shape of the
parameters one time step needs (:meth:`AbstractResidual.shapes`), initialises
them, and evaluates F at one step's parameters. The ODE block keeps the
parameters of all N steps stacked along a leading time axis, so schedules can
read and write them as whole per-step tensors (``K: (N, C, C, 3, 3)``).

Besides the plain fields (``conv_act`` and the pre-activation blocks), three are built so that
their Jacobian's spectrum has the structure a reversible scheme is stable on (Chang et al. 2018,
arXiv:1709.03698; Haber & Ruthotto 2017): ``hamiltonian`` (a partitioned field, for symplectic
Euler), ``conv_antisym`` (imaginary, for the midpoint rule) and ``conv_sym`` (nonpositive, for
leapfrog). Each declares that structure (``spectrum``) and a bound on rho(J) from its stencils
(``spectral_bounds``), which :mod:`msnet.core.stability` compares with the scheme's step limit.
"""

from __future__ import annotations

import abc

import math
from enum import Enum
from typing import ClassVar, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from msnet.errors import MsnetError
from msnet.core.activations import ACTIVATIONS
from msnet.registry import Registry

Params = Dict[str, torch.Tensor]
"""Parameters by name: one step's ``theta`` (``K (C, C, 3, 3)``), or all N steps' stacked (``K (N, C, C, 3, 3)``)."""


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


def _conv_bound(fan_in: int) -> float:
    return 1.0 / math.sqrt(fan_in)


def sym_conv(x: torch.Tensor, K: torch.Tensor, b: torch.Tensor, activation) -> torch.Tensor:
    """K^T sigma(K x + b) for 3x3 stencils K ``(C_out, C_in, 3, 3)``, zero boundary: ``(B, C_in, H, W)``.

    K^T is ``conv_transpose2d(., K, padding=1)``, computed as the equal ``conv2d`` with the
    stencils swapped in and out and flipped, which takes PyTorch's fast convolution path.
    """
    return F.conv2d(activation(F.conv2d(x, K, b, padding=1)), K.transpose(0, 1).flip(2, 3), padding=1)


@RESIDUALS.register("hamiltonian")
class HamiltonianResidual(AbstractResidual):
    """The Hamiltonian field F(Y, Z) = (K1^T sigma(K1 Z + b1), -K2^T sigma(K2 Y + b2)).

    Chang et al. 2018 (arXiv:1709.03698), eq. for the Hamiltonian network; the
    authors' code (github.com/changebo/revnet-public, ``hamiltonian_model.py``) also
    uses one stencil K and its transpose per half. The state's C channels are
    (Y, Z) = (first C/2, last C/2); C must be even. ``parts``: ``"y"`` is dY/dt from Z,
    ``"z"`` is dZ/dt from Y. Parameters per step: ``K1, K2 (C/2, C/2, 3, 3)``,
    ``b1, b2 (C/2,)``; K^T is ``conv_transpose2d`` with the same stencil (zero boundary).
    """

    name = "hamiltonian"
    parts = ("y", "z")
    channel_multiple = 2
    spectrum = Spectrum.imaginary
    kernels = ("K1", "K2")
    kernel_degree = 2

    def __init__(self, channels: int, activation: str = "tanh"):
        if channels % 2:
            raise MsnetError(
                f"residual 'hamiltonian' splits channels into halves (Y, Z); got {channels}, use an even count"
            )
        super().__init__(channels, activation)

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        c = self.channels // 2
        return {"K1": (c, c, 3, 3), "b1": (c,), "K2": (c, c, 3, 3), "b2": (c,)}

    def init_(self, params: Params) -> None:
        bound = _conv_bound(9 * (self.channels // 2))
        with torch.no_grad():
            params["K1"].uniform_(-bound, bound)
            params["K2"].uniform_(-bound, bound)
            params["b1"].zero_()
            params["b2"].zero_()

    def part(self, name: str, x: torch.Tensor, theta: Params) -> torch.Tensor:
        """``"y"``: K1^T sigma(K1 x + b1) with x = Z; ``"z"``: -K2^T sigma(K2 x + b2) with x = Y. ``(B, C/2, H, W)``."""
        if name == "y":
            return sym_conv(x, theta["K1"], theta["b1"], self.activation)
        if name == "z":
            return -sym_conv(x, theta["K2"], theta["b2"], self.activation)
        raise MsnetError(f"residual 'hamiltonian' has parts 'y' and 'z', not {name!r}")

    def __call__(self, y: torch.Tensor, theta: Params) -> torch.Tensor:
        Y, Z = y.chunk(2, dim=1)
        return torch.cat([self.part("y", Z, theta), self.part("z", Y, theta)], dim=1)

    def spectral_bounds(self, params: Params, memory: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """||K1|| ||K2|| per step: J = [[0, M1], [-M2, 0]], M_i = K_i^T D_i K_i, has rho(J)^2 = rho(M1 M2) <= ||M1|| ||M2||."""
        return conv_norm(params["K1"], memory=memory, key="K1") * conv_norm(params["K2"], memory=memory, key="K2")


class AbstractStructuredConv(AbstractResidual):
    """A field on one C x C 3x3 stencil K and a bias b per step whose Jacobian's spectrum has a structure.

    The base of ``conv_sym`` and ``conv_antisym``: parameters per step ``K (C, C, 3, 3)`` (zero boundary) and
    ``b (C,)``, drawn by :func:`init_stencil_and_bias_`, with K alone setting the size of J (``kernels``).
    A final subclass states the field (``__call__``), its ``spectrum`` and its bound on rho(J)
    (``spectral_bounds``, homogeneous of degree ``kernel_degree`` in K).
    """

    kernels = ("K",)

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return stencil_and_bias(self.channels)

    def init_(self, params: Params) -> None:
        init_stencil_and_bias_(params, self.channels)

    @abc.abstractmethod
    def spectral_bounds(self, params: Params, memory: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """rho_j for each step, ``(N,)`` float64 (see :meth:`AbstractResidual.spectral_bounds`)."""


@RESIDUALS.register("conv_sym")
class ConvSym(AbstractStructuredConv):
    """F(y) = -K^T sigma(K y + b): the symmetric (negative semi-definite Jacobian) layer.

    Haber & Ruthotto, "Stable architectures for deep neural networks", Inverse
    Problems 2017 (Meganet's ``doubleSymLayer``); the field of Chang et al. 2018's
    leapfrog network. For monotone sigma the Jacobian -K^T D K is symmetric negative
    semi-definite, so Y'' = F(Y) oscillates instead of growing. Parameters per step:
    ``K (C, C, 3, 3)``, ``b (C,)``; K^T is ``conv_transpose2d`` with the same stencil.
    """

    name = "conv_sym"
    spectrum = Spectrum.nonpositive
    kernel_degree = 2

    def __call__(self, y: torch.Tensor, theta: Params) -> torch.Tensor:
        return -sym_conv(y, theta["K"], theta["b"], self.activation)

    def spectral_bounds(self, params: Params, memory: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """||K||^2 per step: rho(K^T D K) <= ||K||^2 for 0 <= D <= I."""
        return conv_norm(params["K"], memory=memory) ** 2


def antisym_stencil(K: torch.Tensor) -> torch.Tensor:
    """The stencils of K - K^T for stencils K ``(..., C, C, 3, 3)`` (zero boundary): K^T swaps in and out and flips."""
    return K - K.transpose(-4, -3).flip(-2, -1)


@RESIDUALS.register("conv_antisym")
class ConvAntisym(AbstractStructuredConv):
    """F(y) = sigma((K - K^T) y + b): a field whose Jacobian has purely imaginary eigenvalues, the midpoint network's.

    Haber & Ruthotto, "Stable architectures for deep neural networks", Inverse Problems 2017
    (the antisymmetric layer sigma((K - K^T - gamma I) y + b), here with gamma = 0); the
    stability argument of Chang et al. 2018 (arXiv:1709.03698), whose networks are built so
    that J = dF/dy has (nearly) imaginary eigenvalues. K^T is the transposed convolution
    (zero boundary), so A = K - K^T is an exactly antisymmetric matrix on the grid, A^T = -A.

    On it the two-step midpoint rule Y_{j+1} = Y_{j-1} + 2h F(Y_j) is stable for h ||A|| < 1
    (``Midpoint.step_limit``): J = D A, D = diag(sigma'), has the eigenvalues of the antisymmetric D^1/2 A D^1/2,
    so they are i omega with |omega| <= ||A||, and the frozen linearised step's roots
    i h omega +- sqrt(1 - h^2 omega^2) lie on the unit circle, distinct. A real eigenvalue lambda gives
    a parasitic root of modulus ~ 1 + h |lambda| at every h: the plain field sigma(K y + b) (``conv_act``),
    and the reason gamma = 0 here (the damping suits forward Euler; the midpoint rule amplifies it).
    The proof: docs/methods/reversible.md, "Why the midpoint rule is stable on conv_antisym".

    Use it with tanh (the ``midpoint`` preset does): relu keeps the imaginary spectrum, but D's zeros
    leave Jordan blocks (growth linear in t), F >= 0 pushes every state up at every step, and the relu
    network did not learn in msnet's trials (docs/results.md). Parameters per step: ``K (C, C, 3, 3)``,
    ``b (C,)``, the count and cost (one C x C convolution) of ``conv_act``.
    """

    name = "conv_antisym"
    spectrum = Spectrum.imaginary
    kernel_degree = 1

    def __call__(self, y: torch.Tensor, theta: Params) -> torch.Tensor:
        return self.activation(F.conv2d(y, antisym_stencil(theta["K"]), theta["b"], padding=1))

    def spectral_bounds(self, params: Params, memory: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """||K - K^T|| per step: rho(D A) <= ||A||."""
        return conv_norm(antisym_stencil(params["K"]), memory=memory)

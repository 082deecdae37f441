"""Reversible integrators and backprop that rebuilds the states instead of storing them.

Chang, Meng, Haber, Ruthotto, Begert, Holtham, "Reversible architectures for
arbitrarily deep residual neural networks", AAAI 2018 (arXiv:1709.03698), derive
three stable discretisations whose steps can be undone exactly:

    hamiltonian   Y_{j+1} = Y_j + h K1_j^T sigma(K1_j Z_j + b1_j)
                  Z_{j+1} = Z_j - h K2_j^T sigma(K2_j Y_{j+1} + b2_j)      channels split (Y, Z)
    midpoint      Y_{j+1} = Y_{j-1} + 2h F_j(Y_j)                           F = sigma((K - K^T) Y + b)
    leapfrog      Y_{j+1} = 2 Y_j - Y_{j-1} + h^2 F_j(Y_j)                  F = -K^T sigma(K Y + b)

(K^T is the transposed convolution with the same stencils, ``conv_transpose2d``.)

**Stability.** Each scheme is stable only on fields of one structure, and then only for
h small enough (the frozen linearisation e' = J e, J = dF/dy): the midpoint rule and
symplectic Euler need purely imaginary eigenvalues of J, with h rho(J) < 1 and < 2;
leapfrog for Y'' = F(Y) needs J symmetric negative semi-definite, with h^2 rho(J) < 4.
The integrators declare this (``stable_for``, ``step_limit``, ``step_power``) and the
residuals their structure (``spectrum``) and a bound rho_j on rho(J) from step j's
stencils (``spectral_bounds``). :func:`step_ratios` compares the two; a new block scales
each step's stencils so that its ratio is at most 1/2 (:func:`stabilise_`), so a network
starts stable at every state whatever h its preset has. (Training then leaves that bound
behind, 6-9 times the limit for the presets that learn best, while their states stay
bounded: the bound assumes sigma' = 1 everywhere. ``model.step_bound`` keeps it: the trainer
projects every step back onto h^p rho_j / limit <= bound after each update, ``ODEResNet.bound_steps_``.) The midpoint network's field is ``conv_antisym``
(:class:`ConvAntisym`): on msnet's first field, sigma(K Y + b) with a plain K, no step size is
stable (its real eigenvalues excite the parasitic root), and the ``midpoint`` preset with it
reached 9-18 % on Fashion-MNIST; ``model.residual=conv_act`` keeps it for comparison, and
:func:`scheme_note` says so in one line when a run uses it.

**Where the parameters live.** msnet keeps "what the ODE is" (a residual function F
with per-step parameters) apart from "how it is stepped" (an integrator). The
Hamiltonian network is an ODE, d(Y, Z)/dt = (K1^T sigma(K1 Z + b1), -K2^T sigma(K2 Y + b2)),
stepped by symplectic Euler, so it is split the same way: the residual ``hamiltonian``
(:class:`HamiltonianResidual`, registered in ``RESIDUALS``) owns K1, b1, K2, b2 for
C/2 channels and evaluates either half of the field on its own (its ``parts``); the
integrator ``hamiltonian`` steps any residual that has those parts, and refuses
others with one :class:`~msnet.MsnetError` line. The alternative, an integrator that
owns K1..b2 through :meth:`AbstractIntegrator.shapes`, does not fit: an integrator is
built without knowing the channel count, and the block would still build (and
train) the unused parameters of the residual it ignores. With the split, forward
Euler on the same residual (``integrator=euler residual=hamiltonian``) is the
non-symplectic discretisation of the same ODE with the same weights, which is what
the stability comparison needs, and depth/resolution schedules see ordinary per-step
tensors ``K1 (N, C/2, C/2, 3, 3)`` etc. Midpoint and leapfrog need no split: they
step any residual F, and the paper's leapfrog field -K^T sigma(K Y + b) is the
residual ``conv_sym`` (:class:`ConvSym`, Haber & Ruthotto 2017's symmetric layer).

**Schemes as data.** Each scheme is a short table of additive sub-steps
(:class:`Update`) x[dst] <- alpha x[dst] + beta x[src] + c h^p F_part(x[src]) on a
tuple state, followed by a permutation of the tuple. Because F_part reads only
x[src] and src != dst, every sub-step is undone exactly by solving for x[dst], so
forward step, inverse step and the gradient step all come from the one table.

**First steps.** The two-step schemes carry (Y_{j-1}, Y_j) and need Y_1 from Y_0:

- midpoint: forward Euler, Y_1 = Y_0 + h F_0(Y_0). Its O(h^2) local error keeps the
  scheme at order 2.
- leapfrog: Y_1 = Y_0 + (h^2 / 2) F_0(Y_0), the Taylor (Stoermer-Verlet) start of
  Y'' = F(Y) with Y'(0) = 0; order 2.

Both use step 0's parameters, so an N-step block has exactly N parameter slices, as
every msnet integrator. Meganet's ``LeapFrogNN`` (Ruthotto & Haber's MATLAB code,
which cites this paper) starts instead from Y_{-1} = 0, i.e. Y_1 = 2 Y_0 + h^2 F_0(Y_0);
that start is not consistent with the ODE (Y_j then grows like j Y_0), so msnet
does not use it. The paper's own equations for the first step could not be read
from here.

**Reversible backprop** (:func:`odeint_scheme` with ``backprop="reversible"``) runs a
stage in a custom :class:`torch.autograd.Function` that keeps only the final state
(two tensors) and the parameters. Backward walks the steps from last to first:
for each sub-step it evaluates F_part once with autograd on (the source state and
step j's parameter slices), undoes the sub-step with that value, and pulls the
gradient back through it with one vector-Jacobian product. So a step costs one
extra residual evaluation over ordinary backprop (about 4/3 of its time), and the
activation memory of a stage does not grow with its depth. The states used for the
gradient are rebuilt ones: they agree with the stored states to round-off (after 64
steps, relative to max |y|: float64 2e-16 to 4e-15, float32 1e-7 to 4e-6, leapfrog
the largest), so gradients agree with ``backprop="store"`` to the same level. A
scheme is only as reversible as its inverse is stable: midpoint on a field with real
eigenvalues amplifies round-off backward as it amplifies data forward. Double
backward is not supported.

**Precision** (:class:`PrecisionState`). Rebuilding subtracts the very F value the forward
added only if backward evaluates F in the forward's arithmetic, so the backward replays
the forward's autocast state (autograd runs it outside the caller's autocast) and, on
CUDA, both run their convolutions in IEEE float32 whatever the global TF32 flag says,
unless ``tf32=True`` (``trainer.reversible_tf32``; TF32 rounds to ~5e-4, and a kernel in
backward that differs from the forward's by that much leaves it in every rebuilt state).
Under autocast the state of a scheme stage stays in the parameters' dtype (float32) for
both backprops and only F runs in bfloat16 (:func:`state_dtype`): a bf16 state cannot be
rebuilt (each sub-step's rounding is lost) and drops updates below 2^-9 |y|, which made
store's bf16 gradients 19 % (hamiltonian) to 60 % (leapfrog) off at 256 steps on the CPU;
with float32 states both stay within bf16's ~5e-3 of float64 and agree with each other
to 1e-3 or better (tests/test_precision.py).
"""

from __future__ import annotations

import abc

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from msnet import MsnetError
from msnet.core.device import ieee_fp32_convolutions
from msnet.core.integrators import INTEGRATORS, AbstractIntegrator, Params, StepFunction
from msnet.core.residual import (RESIDUALS, AbstractResidual, Spectrum, conv_norm, init_stencil_and_bias_,
                                 stencil_and_bias)

State = Tuple[torch.Tensor, ...]
BACKPROPS = ("store", "reversible")


@dataclass(frozen=True)
class Update:
    """One sub-step on a tuple state: x[dst] <- alpha x[dst] + beta x[src] + coef h^power F_part(x[src]).

    ``part`` names the piece of the residual function evaluated (``None``: F itself;
    ``"y"``/``"z"``: one half of a partitioned field, see :class:`HamiltonianResidual`).
    F_part depends on x[src] only and ``src != dst``, so the sub-step is undone by
    x[dst] <- (x[dst] - beta x[src] - coef h^power F_part(x[src])) / alpha.
    """

    dst: int
    src: int
    coef: float
    power: int = 1
    alpha: float = 1.0
    beta: float = 0.0
    part: Optional[str] = None


Evaluate = Callable[[Update, torch.Tensor], torch.Tensor]
"""``F(u, x)``: step j's residual (or the part ``u.part`` of it) at ``x``."""


def residual_evaluator(residual: AbstractResidual, theta: Params) -> Evaluate:
    """Evaluate ``residual`` (or one of its parts) with one step's parameters ``theta``."""

    def evaluate(u: Update, x: torch.Tensor) -> torch.Tensor:
        if u.part is None:
            return residual(x, theta)
        return residual.part(u.part, x, theta)

    return evaluate


class ReversibleScheme(AbstractIntegrator):
    """An integrator given by tables of invertible sub-steps (:class:`Update`); ``reversible = True``.

    The state is a tuple of tensors built from y_0 by :meth:`start` and turned back
    into y by :meth:`finish` (``finish(start(y)) == y``). Step 0 applies ``first``,
    later steps ``rest``; each step then reorders the tuple by ``perm``
    (new[i] = old[perm[i]]). ``parts`` lists the residual parts the tables use.
    """

    reversible = True
    first: ClassVar[Tuple[Update, ...]]
    rest: ClassVar[Tuple[Update, ...]]
    perm: ClassVar[Tuple[int, ...]]

    @abc.abstractmethod
    def start(self, y0: torch.Tensor) -> State:
        """The state before step 0, from y_0 ``(B, C, H, W)``."""

    @abc.abstractmethod
    def finish(self, state: State) -> torch.Tensor:
        """y ``(B, C, H, W)`` from a state."""

    def updates(self, j: int) -> Tuple[Update, ...]:
        """The sub-steps of step j."""
        return self.first if j == 0 else self.rest

    def step(self, F: Evaluate, j: int, h: float, state: State, scale: float = 1.0) -> State:
        """Step j: the state after it. ``scale`` multiplies every F term (stochastic depth's gate)."""
        x = list(state)
        for u in self.updates(j):
            c = u.coef * h**u.power * scale
            new = x[u.dst] if u.alpha == 1.0 else u.alpha * x[u.dst]
            if u.beta != 0.0:
                new = new + u.beta * x[u.src]
            if c != 0.0:
                new = torch.add(new, F(u, x[u.src]), alpha=c)
            x[u.dst] = new
        return tuple(x[p] for p in self.perm)

    def _unpermute(self, values: Sequence) -> list:
        old = [None] * len(values)
        for i, p in enumerate(self.perm):
            old[p] = values[i]
        return old

    def inverse_step(self, F: Evaluate, j: int, h: float, state: State, scale: float = 1.0) -> State:
        """Undo step j: the state before it, from the state after it (exact up to round-off)."""
        x = self._unpermute(state)
        for u in reversed(self.updates(j)):
            c = u.coef * h**u.power * scale
            x[u.dst] = self._undo(u, x, c, F(u, x[u.src]) if c != 0.0 else None)
        return tuple(x)

    @staticmethod
    def _undo(u: Update, x: list, c: float, v: Optional[torch.Tensor]) -> torch.Tensor:
        old = x[u.dst]
        if v is not None:
            old = torch.sub(old, v, alpha=c)
        if u.beta != 0.0:
            old = old - u.beta * x[u.src]
        return old if u.alpha == 1.0 else old / u.alpha

    def reverse_step(
        self, F: Evaluate, j: int, h: float, state: State, grads: List[torch.Tensor],
        inputs: Sequence[torch.Tensor], scale: float = 1.0,
    ) -> Tuple[State, List[torch.Tensor], List[Optional[torch.Tensor]]]:
        """Undo step j and pull the gradient back through it.

        ``state``: the state after step j; ``grads``: dL/d(that state), one tensor per
        entry; ``inputs``: leaf tensors F closes over (step j's parameter slices).
        Returns the state before step j, dL/d(it), and dL/d(inputs) (``None`` where
        unused). Each sub-step evaluates its F_part once, with autograd, and uses the
        value both to undo the sub-step and for the vector-Jacobian product.
        """
        x = self._unpermute(state)
        g = self._unpermute(grads)
        g_in: List[Optional[torch.Tensor]] = [None] * len(inputs)
        for u in reversed(self.updates(j)):
            c = u.coef * h**u.power * scale
            g_dst = g[u.dst]
            if c != 0.0:
                src = x[u.src].detach().requires_grad_(True)
                with torch.enable_grad():
                    v = F(u, src)
                vjp = torch.autograd.grad(v, (src, *inputs), c * g_dst, allow_unused=True)
                x[u.dst] = self._undo(u, x, c, v.detach())
                if vjp[0] is not None:
                    g[u.src] = g[u.src] + vjp[0]
                for i, gi in enumerate(vjp[1:]):
                    if gi is not None:
                        g_in[i] = gi if g_in[i] is None else g_in[i] + gi
            else:
                x[u.dst] = self._undo(u, x, c, None)
            if u.beta != 0.0:
                g[u.src] = g[u.src] + u.beta * g_dst
            if u.alpha != 1.0:
                g[u.dst] = u.alpha * g_dst
        return tuple(x), g, g_in

    def integrate(self, f: StepFunction, y0: torch.Tensor, h: float, n_steps: int, params: Params) -> torch.Tensor:
        """y_N from y_0 through ``f(j, y)`` alone (the generic integrator API).

        A partitioned sub-step evaluates the whole F on a state that is zero outside
        x[src] and keeps the x[dst] half: right for fields whose parts read only their
        source, at twice the work. :class:`~msnet.core.network.ODEBlock` does not come
        here: it calls :func:`odeint_scheme`, which evaluates the parts alone.
        """
        state = self.start(y0)
        for j in range(n_steps):

            def evaluate(u: Update, x: torch.Tensor, j: int = j) -> torch.Tensor:
                if u.part is None:
                    return f(j, x)
                whole = [torch.zeros_like(x) for _ in state]
                whole[u.src] = x
                return self.start(f(j, self.finish(tuple(whole))))[u.dst]

            state = self.step(evaluate, j, h, state)
        return self.finish(state)


class TwoStepScheme(ReversibleScheme):
    """State (Y_{j-1}, Y_j); each step writes Y_{j+1} over Y_{j-1} and swaps. Starts from (Y_0, Y_0)."""

    history = 2
    perm = (1, 0)

    def start(self, y0: torch.Tensor) -> State:
        return (y0, y0)

    def finish(self, state: State) -> torch.Tensor:
        return state[1]


@INTEGRATORS.register("midpoint")
class Midpoint(TwoStepScheme):
    """The midpoint (leapfrog two-step) rule Y_{j+1} = Y_{j-1} + 2h F_j(Y_j). Order 2.

    Chang et al. 2018 (arXiv:1709.03698), the Midpoint Network, Y_{j+1} = Y_{j-1} + 2h sigma(K_j Y_j + b_j),
    here with K_j antisymmetric (``residual=conv_antisym``, see :class:`ConvAntisym` for why);
    Hairer-Norsett-Wanner, *Solving ODEs I*, sec. III.1.
    First step: forward Euler Y_1 = Y_0 + h F_0(Y_0). Inverse: Y_{j-1} = Y_{j+1} - 2h F_j(Y_j).
    Stable for fields whose Jacobian has imaginary eigenvalues i omega with h |omega| < 1
    (``stable_for``, ``step_limit``); a real eigenvalue excites the parasitic root -1
    (weak instability), as the paper discusses.
    """

    name = "midpoint"
    order = 2
    stages = 1
    stable_for = (Spectrum.imaginary,)
    step_limit = 1.0
    first = (Update(dst=0, src=1, coef=1.0),)
    rest = (Update(dst=0, src=1, coef=2.0),)


@INTEGRATORS.register("leapfrog")
class Leapfrog(TwoStepScheme):
    """Leapfrog (Stoermer-Verlet) for Y'' = F(Y): Y_{j+1} = 2Y_j - Y_{j-1} + h^2 F_j(Y_j). Order 2.

    Chang et al. 2018 (arXiv:1709.03698), the Leapfrog Network, with
    F = -K^T sigma(K Y + b) (``residual=conv_sym``), which makes Y'' = F(Y) stable
    (Haber & Ruthotto, "Stable architectures for deep neural networks", 2017).
    First step: Y_1 = Y_0 + (h^2/2) F_0(Y_0) (Y'(0) = 0). Inverse:
    Y_{j-1} = 2Y_j - Y_{j+1} + h^2 F_j(Y_j). ``T`` is the final time of Y'' = F(Y).
    Stability: on Y'' = -M Y with M = K^T D K symmetric positive semi-definite the step's
    characteristic roots z^2 - (2 - h^2 mu) z + 1 = 0 (mu an eigenvalue of M) lie on the unit
    circle iff h^2 mu < 4, so the condition is h^2 rho(J) < 4 (rho(J) <= ||K||^2).
    """

    name = "leapfrog"
    order = 2
    stages = 1
    stable_for = (Spectrum.nonpositive,)
    step_limit = 4.0
    step_power = 2
    first = (Update(dst=0, src=1, coef=0.5, power=2),)
    rest = (Update(dst=0, src=1, coef=1.0, power=2, alpha=-1.0, beta=2.0),)


@INTEGRATORS.register("hamiltonian")
class Hamiltonian(ReversibleScheme):
    """Symplectic Euler for the Hamiltonian field of :class:`HamiltonianResidual`. Order 1.

    Chang et al. 2018 (arXiv:1709.03698), the Hamiltonian Network: the state's
    channels are split into (Y, Z) halves and
    Y_{j+1} = Y_j + h F_y(Z_j),  Z_{j+1} = Z_j + h F_z(Y_{j+1}),
    with F_y(Z) = K1^T sigma(K1 Z + b1), F_z(Y) = -K2^T sigma(K2 Y + b2). Inverse:
    Z_j = Z_{j+1} - h F_z(Y_{j+1}), Y_j = Y_{j+1} - h F_y(Z_j). One step is one
    Hamiltonian block of the paper (two 'layers', four convolutions). Needs a residual
    with parts ``("y", "z")``: ``residual=hamiltonian``. Stability: on the linear field
    (M1 Z, -M2 Y) the step's roots z^2 - (2 - h^2 mu) z + 1 = 0, mu an eigenvalue of M1 M2
    (real, >= 0), lie on the unit circle iff h^2 mu < 4; as rho(J)^2 = rho(M1 M2), h rho(J) < 2.
    """

    name = "hamiltonian"
    order = 1
    history = 1
    stages = 2
    parts = ("y", "z")
    stable_for = (Spectrum.imaginary,)
    step_limit = 2.0
    perm = (0, 1)
    first = rest = (Update(dst=0, src=1, coef=1.0, part="y"), Update(dst=1, src=0, coef=1.0, part="z"))

    def start(self, y0: torch.Tensor) -> State:
        return tuple(y0.chunk(2, dim=1))

    def finish(self, state: State) -> torch.Tensor:
        return torch.cat(state, dim=1)


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


@RESIDUALS.register("conv_sym")
class ConvSym(AbstractResidual):
    """F(y) = -K^T sigma(K y + b): the symmetric (negative semi-definite Jacobian) layer.

    Haber & Ruthotto, "Stable architectures for deep neural networks", Inverse
    Problems 2017 (Meganet's ``doubleSymLayer``); the field of Chang et al. 2018's
    leapfrog network. For monotone sigma the Jacobian -K^T D K is symmetric negative
    semi-definite, so Y'' = F(Y) oscillates instead of growing. Parameters per step:
    ``K (C, C, 3, 3)``, ``b (C,)``; K^T is ``conv_transpose2d`` with the same stencil.
    """

    name = "conv_sym"
    spectrum = Spectrum.nonpositive
    kernels = ("K",)
    kernel_degree = 2

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return stencil_and_bias(self.channels)

    def init_(self, params: Params) -> None:
        init_stencil_and_bias_(params, self.channels)

    def __call__(self, y: torch.Tensor, theta: Params) -> torch.Tensor:
        return -sym_conv(y, theta["K"], theta["b"], self.activation)

    def spectral_bounds(self, params: Params, memory: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """||K||^2 per step: rho(K^T D K) <= ||K||^2 for 0 <= D <= I."""
        return conv_norm(params["K"], memory=memory) ** 2


def antisym_stencil(K: torch.Tensor) -> torch.Tensor:
    """The stencils of K - K^T for stencils K ``(..., C, C, 3, 3)`` (zero boundary): K^T swaps in and out and flips."""
    return K - K.transpose(-4, -3).flip(-2, -1)


@RESIDUALS.register("conv_antisym")
class ConvAntisym(AbstractResidual):
    """F(y) = sigma((K - K^T) y + b): a field whose Jacobian has purely imaginary eigenvalues, the midpoint network's.

    Haber & Ruthotto, "Stable architectures for deep neural networks", Inverse Problems 2017
    (the antisymmetric layer sigma((K - K^T - gamma I) y + b), here with gamma = 0); the
    stability argument of Chang et al. 2018 (arXiv:1709.03698), whose networks are built so
    that J = dF/dy has (nearly) imaginary eigenvalues. K^T is the transposed convolution
    (zero boundary), so A = K - K^T is an exactly antisymmetric matrix on the grid, A^T = -A.

    Why the two-step midpoint rule Y_{j+1} = Y_{j-1} + 2h F(Y_j) is stable on it:

    - J = D A with D = diag(sigma'(A y + b)), 0 <= D <= I. DA = D^1/2 (D^1/2 A), and XY and YX
      have the same nonzero eigenvalues, so J's are those of S = D^1/2 A D^1/2, which is real
      antisymmetric (S^T = -S): all are i omega with |omega| <= ||S|| <= ||A||. For tanh D > 0,
      and J = D^1/2 S D^-1/2 is similar to S, so diagonalisable.
    - The frozen linearisation e_{j+1} = e_{j-1} + 2h J e_j has, on an eigenvector with eigenvalue
      lambda, the roots z = h lambda +- sqrt(1 + h^2 lambda^2) (z+ z- = -1). For lambda = i omega with
      h |omega| < 1 both are i h omega +- sqrt(1 - h^2 omega^2), on the unit circle and distinct: no
      mode grows, and the linearised steps stay bounded over any number of steps. So h ||A|| < 1 is
      the step-size condition (``Midpoint.step_limit``; :func:`stabilise_` starts at h ||A|| <= 1/2).
    - For a real lambda one root has |z| = h |lambda| + sqrt(1 + h^2 lambda^2) ~ 1 + h |lambda|: the
      parasitic root grows like exp(|lambda| t) whatever lambda's sign. That is the plain field
      sigma(K y + b) (``conv_act``), on which no h is stable, and why gamma = 0 here: Haber &
      Ruthotto's damping -gamma I suits forward Euler, but the midpoint rule would amplify it.

    Use it with tanh (the ``midpoint`` preset does): relu keeps the imaginary spectrum, but
    D's zeros leave Jordan blocks (growth linear in t), F >= 0 pushes every state up at every
    step, and in msnet's trials the relu network did not learn (9.4 % on Fashion-MNIST after
    two epochs on 2,000 images, tanh 57.6 %). Parameters per step: ``K (C, C, 3, 3)``, ``b (C,)``,
    the count and cost (one C x C convolution) of ``conv_act``.
    """

    name = "conv_antisym"
    spectrum = Spectrum.imaginary
    kernels = ("K",)
    kernel_degree = 1

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return stencil_and_bias(self.channels)

    def init_(self, params: Params) -> None:
        init_stencil_and_bias_(params, self.channels)

    def __call__(self, y: torch.Tensor, theta: Params) -> torch.Tensor:
        return self.activation(F.conv2d(y, antisym_stencil(theta["K"]), theta["b"], padding=1))

    def spectral_bounds(self, params: Params, memory: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """||K - K^T|| per step: rho(D A) <= ||A||."""
        return conv_norm(antisym_stencil(params["K"]), memory=memory)


INIT_STEP_RATIO = 0.5
"""A new block's steps start at most this far along their stability limit (:func:`stabilise_`)."""


def step_ratios(integrator: AbstractIntegrator, residual: AbstractResidual, params: Params,
                h: float, memory: Optional[Dict[str, torch.Tensor]] = None) -> Optional[torch.Tensor]:
    """h^p rho_j / step_limit for each step j of stacked ``params`` ``(N, *shape)``: ``(N,)``, float64.

    Below 1 the frozen linearised step j is stable (the integrator's condition, with rho_j the
    residual's bound on rho(J)). None where no condition applies: the integrator states none,
    the residual's spectrum is not one the scheme is stable on (:func:`scheme_note`; no h helps
    there), or the residual has no bound. ``memory``: warm-started norm estimates (:func:`conv_norm`).
    """
    if integrator.step_limit is None or residual.spectrum not in integrator.stable_for:
        return None
    rho = residual.spectral_bounds({k: params[k] for k in residual.shapes()}, memory)
    if rho is None:
        return None
    return h**integrator.step_power * rho / integrator.step_limit


def stabilise_(integrator: AbstractIntegrator, residual: AbstractResidual, params: Params, h: float,
               target: float = INIT_STEP_RATIO, memory: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Scale the kernels of each step whose :func:`step_ratios` exceeds ``target`` down to ``target``, in place.

    For a new block: PyTorch's default scale puts ||K|| near 1.17 whatever the width, so a step
    of h = 1 starts at 1.7 of the midpoint's limit with ``conv_antisym`` (unstable) and at 0.68
    of symplectic Euler's with ``hamiltonian``; at h = T/N <= 1/4 nothing changes. A step's
    kernels are scaled by (target / ratio)^(1 / kernel_degree), which scales its bound by
    target / ratio. During training (``model.step_bound``, :meth:`ODEBlock.bound_steps_`) the same
    projection runs after every update, with ``memory`` keeping the norm estimates warm.
    """
    ratios = step_ratios(integrator, residual, params, h, memory)
    if ratios is None:
        return
    factor = (target / ratios).clamp(max=1.0) ** (1.0 / residual.kernel_degree)
    with torch.no_grad():
        for k in residual.kernels:
            p = params[k]
            p.mul_(factor.to(device=p.device, dtype=p.dtype).reshape(-1, *[1] * (p.dim() - 1)))


def stable_fields(integrator_cls: type) -> List[str]:
    """The residuals ``integrator_cls`` is stable on: a spectrum it declares, and the parts it steps."""
    return [r for r in RESIDUALS.names() if RESIDUALS.get(r).spectrum in integrator_cls.stable_for
            and set(integrator_cls.parts) <= set(RESIDUALS.get(r).parts)]


def scheme_note(integrator_cls: type, residual_cls: type) -> Optional[str]:
    """One line when the integrator is stable on no step size with this residual's spectrum; None otherwise.

    Not an error: the unstable pairing stays available for comparison (the plain midpoint network).
    """
    stable = integrator_cls.stable_for
    if not stable or residual_cls.spectrum in stable:
        return None
    return (f"integrator {integrator_cls.name!r} is stable only on fields whose Jacobian spectrum is "
            f"{' or '.join(s.value for s in stable)}, and that of residual {residual_cls.name!r} is "
            f"{residual_cls.spectrum.value}, so its steps can grow like exp(|lambda| t) at any h; "
            f"the stable fields are model.residual={' or '.join(stable_fields(integrator_cls))}")


def reversible_names() -> List[str]:
    """Names of the registered integrators with an exact inverse step."""
    return [n for n in INTEGRATORS.names() if INTEGRATORS.get(n).reversible]


def check_scheme(integrator_cls: type, residual_cls: type, backprop: str, widths: Sequence[int] = ()) -> None:
    """Fail with one line unless the integrator class can step the residual class with ``backprop`` at these widths."""
    integrator, residual = integrator_cls.name, residual_cls.name
    if backprop not in BACKPROPS:
        raise MsnetError(f"unknown model.backprop {backprop!r}; choose one of: {', '.join(BACKPROPS)}")
    if backprop == "reversible" and not integrator_cls.reversible:
        raise MsnetError(
            f"model.backprop=reversible needs a reversible integrator, and {integrator!r} is not; "
            f"use model.integrator= one of: {', '.join(reversible_names())} (or model.backprop=store)"
        )
    needs = set(integrator_cls.parts)
    if not needs <= set(residual_cls.parts):
        fits = [r for r in RESIDUALS.names() if needs <= set(RESIDUALS.get(r).parts)]
        raise MsnetError(
            f"integrator {integrator!r} steps the parts {sorted(needs)} of a partitioned field, "
            f"which residual {residual!r} lacks; use model.residual= one of: {', '.join(fits)}"
        )
    multiple = residual_cls.channel_multiple
    if any(c % multiple for c in widths):
        raise MsnetError(
            f"residual {residual!r} needs channel counts divisible by {multiple}, got stage widths {list(widths)}"
        )


def uses_scheme(integrator: AbstractIntegrator) -> bool:
    """Whether :func:`odeint_scheme` (part-wise evaluation, reversible backprop) can run ``integrator``."""
    return isinstance(integrator, ReversibleScheme)


def state_dtype(y0: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y_0 in the parameters' ``dtype`` when autocast handed it in a narrower float (bf16, fp16).

    Under autocast the stage's state and its additive sub-steps stay float32 and only F
    runs in bfloat16: a bf16 state would lose every update below 2^-9 |y| (h F with
    h = T/N shrinks with depth), and a sub-step rounded to bf16 cannot be undone.
    """
    if y0.is_floating_point() and torch.finfo(y0.dtype).bits < torch.finfo(dtype).bits:
        return y0.to(dtype)
    return y0


@dataclass(frozen=True)
class PrecisionState:
    """The arithmetic a reversible stage's forward ran in, replayed by its backward.

    Backward rebuilds each state by subtracting the F value the forward added, so it must
    evaluate F exactly as the forward did: the same autocast state (autograd runs a
    Function's backward outside the caller's autocast) and, on CUDA, full float32
    convolutions in both (TF32 off, :func:`~msnet.core.device.ieee_fp32_convolutions`)
    unless the user allowed TF32 (``tf32=True``, ``trainer.reversible_tf32``).
    """

    device_type: str
    autocast: bool
    autocast_dtype: torch.dtype
    ieee_fp32: bool

    @classmethod
    def capture(cls, device: torch.device, tf32: bool = False) -> "PrecisionState":
        """The current autocast state on ``device``'s type; TF32 off on CUDA unless ``tf32``."""
        t = device.type
        return cls(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t), t == "cuda" and not tf32)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block in this arithmetic (global flags restored on exit, also on error)."""
        with torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast), \
                ieee_fp32_convolutions(self.ieee_fp32):
            yield


def odeint_scheme(
    scheme: ReversibleScheme, residual: AbstractResidual, y0: torch.Tensor, h: float,
    params: Dict[str, torch.Tensor], scales: Optional[Sequence[float]] = None, backprop: str = "store",
    tf32: bool = False, probe: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """y_N from y_0 ``(B, C, H, W)`` with ``scheme`` on ``residual``, N = ``params[*].shape[0]`` steps of size h.

    ``params``: every per-step parameter of the block (the residual's and the scheme's),
    ``(N, *shape)`` each. ``scales`` ``(N,)``: a factor on step j's F terms (stochastic
    depth's gate or its mean), ``None`` for 1. ``backprop="store"`` keeps autograd's
    graph of every step; ``"reversible"`` keeps only the final state and rebuilds the
    rest in backward (see the module docstring). ``probe(j, y_j)``, if given, sees the whole state
    ``(B, C, H, W)`` before each step j (in the forward only; a reversible backward's rebuilt states do not).
    """
    names = list(params)
    stacked = [params[k] for k in names]
    n = stacked[0].shape[0]
    scales = [1.0] * n if scales is None else [float(s) for s in scales]
    y0 = state_dtype(y0, stacked[0].dtype)
    needs_graph = torch.is_grad_enabled() and (y0.requires_grad or any(p.requires_grad for p in stacked))
    if backprop == "reversible" and needs_graph:
        return _ReversibleSolve.apply(scheme, residual, h, scales, names, tf32, probe, y0, *stacked)
    state = scheme.start(y0)
    for j in range(n):
        if probe is not None:
            probe(j, scheme.finish(state))
        theta = {k: p[j] for k, p in zip(names, stacked)}
        state = scheme.step(residual_evaluator(residual, theta), j, h, state, scales[j])
    return scheme.finish(state)


class _ReversibleSolve(torch.autograd.Function):
    """One stage with reversible backprop; saves the final state and the stacked parameters only."""

    @staticmethod
    def forward(ctx, scheme, residual, h, scales, names, tf32, probe, y0, *stacked):  # type: ignore[override]
        n = stacked[0].shape[0]
        ctx.precision = PrecisionState.capture(y0.device, tf32)
        with torch.no_grad(), ctx.precision.replay():
            state = scheme.start(y0)
            for j in range(n):
                if probe is not None:
                    probe(j, scheme.finish(state))
                theta = {k: p[j] for k, p in zip(names, stacked)}
                state = scheme.step(residual_evaluator(residual, theta), j, h, state, scales[j])
            out = scheme.finish(state)
        ctx.scheme, ctx.residual, ctx.h, ctx.scales, ctx.names = scheme, residual, h, scales, names
        ctx.n_state = len(state)
        ctx.save_for_backward(*state, *stacked)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out):  # type: ignore[override]
        saved = ctx.saved_tensors
        state, stacked = tuple(saved[: ctx.n_state]), saved[ctx.n_state :]
        with ctx.precision.replay():
            return _ReversibleSolve._backward(ctx, state, stacked, g_out)

    @staticmethod
    def _backward(ctx, state, stacked, g_out):
        scheme: ReversibleScheme = ctx.scheme
        with torch.enable_grad():
            leaves = tuple(s.detach().requires_grad_(True) for s in state)
            grads = torch.autograd.grad(scheme.finish(leaves), leaves, g_out, allow_unused=True)
        g = [torch.zeros_like(s) if gi is None else gi for s, gi in zip(state, grads)]
        n = stacked[0].shape[0]
        per_step: List[List[torch.Tensor]] = [[] for _ in stacked]
        for j in reversed(range(n)):
            theta = [p[j].detach().requires_grad_(True) for p in stacked]
            F_j = residual_evaluator(ctx.residual, dict(zip(ctx.names, theta)))
            state, g, g_theta = scheme.reverse_step(F_j, j, ctx.h, state, g, theta, ctx.scales[j])
            for i, gi in enumerate(g_theta):
                per_step[i].append(torch.zeros_like(theta[i]) if gi is None else gi)
        g_y0 = None
        if ctx.needs_input_grad[7]:
            with torch.enable_grad():
                y0 = scheme.finish(state).detach().requires_grad_(True)
                (g_y0,) = torch.autograd.grad(scheme.start(y0), y0, g, allow_unused=True)
        g_params = [torch.stack(steps[::-1]) for steps in per_step]
        return (None, None, None, None, None, None, None, g_y0, *g_params)

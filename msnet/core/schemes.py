"""Reversible schemes: integrators whose every step is undone exactly, given as tables of sub-steps.

Chang, Meng, Haber, Ruthotto, Begert, Holtham, "Reversible architectures for
arbitrarily deep residual neural networks", AAAI 2018 (arXiv:1709.03698), derive
three stable discretisations whose steps can be undone exactly:

    hamiltonian   Y_{j+1} = Y_j + h K1_j^T sigma(K1_j Z_j + b1_j)
                  Z_{j+1} = Z_j - h K2_j^T sigma(K2_j Y_{j+1} + b2_j)      channels split (Y, Z)
    midpoint      Y_{j+1} = Y_{j-1} + 2h F_j(Y_j)                           F = sigma((K - K^T) Y + b)
    leapfrog      Y_{j+1} = 2 Y_j - Y_{j-1} + h^2 F_j(Y_j)                  F = -K^T sigma(K Y + b)

(K^T is the transposed convolution with the same stencils.) The fields are residuals
(:mod:`msnet.core.residual`: ``hamiltonian``, ``conv_antisym``, ``conv_sym``), so the Hamiltonian
network's K1..b2 belong to the residual, which evaluates either half alone (its ``parts``), and
forward Euler on it is the non-symplectic discretisation of the same ODE with the same weights
(why: docs/methods/reversible.md). Step-size conditions: :mod:`msnet.core.stability`; backprop
that rebuilds the states: :mod:`msnet.core.reversible`.

**Schemes as data.** A scheme is a short table of additive sub-steps (:class:`Update`)
x[dst] <- alpha x[dst] + beta x[src] + c h^p F_part(x[src]) on a tuple state, then a permutation
of the tuple. F_part reads only x[src] and src != dst, so every sub-step is undone exactly by
solving for x[dst]: forward step, inverse step and gradient step all come from the one table.

**First steps.** The two-step schemes carry (Y_{j-1}, Y_j) and need Y_1 from Y_0, with step 0's
parameters (so an N-step block has N parameter slices): midpoint takes forward Euler,
Y_1 = Y_0 + h F_0(Y_0); leapfrog the Taylor (Stoermer-Verlet) start Y_1 = Y_0 + (h^2 / 2) F_0(Y_0)
of Y'' = F(Y) with Y'(0) = 0. Both keep order 2. Deviation: Meganet's ``LeapFrogNN`` (Ruthotto &
Haber's code) starts from Y_{-1} = 0, which is not consistent with the ODE (Y_j grows like j Y_0).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, ClassVar, List, Optional, Sequence, Tuple

import torch

from msnet.core.integrators import INTEGRATORS, AbstractIntegrator, StepFunction
from msnet.core.residual import AbstractResidual, Params, Spectrum

State = Tuple[torch.Tensor, ...]
BACKPROPS = ("store", "reversible")
"""The values of ``model.backprop``; ``msnet.config.Backprop`` lists the same (a test keeps them equal)."""


@dataclass(frozen=True)
class Update:
    """One sub-step on a tuple state: x[dst] <- alpha x[dst] + beta x[src] + coef h^power F_part(x[src]).

    ``part`` names the piece of the residual function evaluated (``None``: F itself;
    ``"y"``/``"z"``: one half of a partitioned field, see :class:`~msnet.core.residual.HamiltonianResidual`).
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
    here with K_j antisymmetric (``residual=conv_antisym``, see :class:`~msnet.core.residual.ConvAntisym` for why);
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
    """Symplectic Euler for the Hamiltonian field of :class:`~msnet.core.residual.HamiltonianResidual`. Order 1.

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

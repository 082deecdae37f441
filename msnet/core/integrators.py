"""Time integrators: how an ODE block steps dy/dt = F(y; theta(t)) over [0, T] in N steps.

The control theta(t) is piecewise constant: step j (from t_j = j h to t_{j+1})
uses the j-th slice of every per-step parameter, so an N-step block has exactly
N parameter slices, and a forward-Euler block is a ResNet with N residual layers.

Every integrator is a registered class that carries its facts: ``order`` (global
order of accuracy for a smooth autonomous ODE), ``reversible`` (has an exact
inverse step), ``history`` (how many past states a step needs: 1 for one-step
methods, 2 for two-step schemes such as leapfrog or LM), ``stages`` (residual
evaluations per step) and ``per_step_params`` (parameters can be moved in time
by the depth schedules). Where numerical analysis gives one, an integrator also
declares its stability condition: the Jacobian spectra it is stable on
(``stable_for``) and the step size it needs there, h^step_power rho(J) < step_limit
(:mod:`msnet.core.stability`). A scheme may add learnable per-step parameters of its
own through :meth:`AbstractIntegrator.shapes` (a linear multistep scheme's
k_n, say) without any change elsewhere.
"""

from __future__ import annotations

import abc

from typing import Callable, ClassVar, Dict, Optional, Sequence, Tuple

import torch

from msnet.core.residual import Params, Spectrum
from msnet.registry import Registry

StepFunction = Callable[[int, torch.Tensor], torch.Tensor]
"""``f(j, y)``: the residual F evaluated at state ``y`` with step ``j``'s parameters."""


class AbstractIntegrator(abc.ABC):
    """Base of all integrators. Subclasses set the facts and implement :meth:`integrate`."""

    name: ClassVar[str]
    order: ClassVar[int]
    reversible: ClassVar[bool] = False
    history: ClassVar[int] = 1
    stages: ClassVar[int] = 1
    per_step_params: ClassVar[bool] = True
    parts: ClassVar[Tuple[str, ...]] = ()
    """The parts of a partitioned field (:attr:`AbstractResidual.parts`) the scheme evaluates alone; () for none."""
    stable_for: ClassVar[Tuple[Spectrum, ...]] = ()
    """The Jacobian spectra (:attr:`AbstractResidual.spectrum`) the scheme is stable on, for h small enough;
    () where msnet states no condition (the explicit one-step methods, on which msnet's ResNets run with h <= 1/4)."""
    step_limit: ClassVar[Optional[float]] = None
    step_power: ClassVar[int] = 1
    """On a field in ``stable_for`` with spectral radius rho, the frozen linearised step is stable while
    h^step_power rho < step_limit (None: no condition stated)."""

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Per-step parameters the scheme itself learns (shape of one step). None by default."""
        return {}

    def init_(self, params: Params) -> None:
        """Initialise the scheme's own stacked per-step parameters in place."""

    @abc.abstractmethod
    def integrate(self, f: StepFunction, y0: torch.Tensor, h: float, n_steps: int, params: Params) -> torch.Tensor:
        """Return y_N from y_0 ``(B, C, H, W)`` after ``n_steps`` steps of size ``h``."""

    @classmethod
    def facts(cls) -> Dict[str, object]:
        """The registry facts, as a dict for tables and checkpoints."""
        return {
            "name": cls.name,
            "order": cls.order,
            "reversible": cls.reversible,
            "history": cls.history,
            "stages": cls.stages,
            "per_step_params": cls.per_step_params,
        }


class ExplicitRungeKutta(AbstractIntegrator):
    """An explicit Runge-Kutta method given by its Butcher tableau (a, b).

    ``a[i]`` holds the coefficients of stage i on the earlier stages; the stage
    nodes c are not needed because the control is constant within a step.
    Hairer, Norsett, Wanner, *Solving ODEs I*, sec. II.1.
    """

    a: ClassVar[Sequence[Sequence[float]]]
    b: ClassVar[Sequence[float]]

    def integrate(self, f: StepFunction, y0: torch.Tensor, h: float, n_steps: int, params: Params) -> torch.Tensor:
        y = y0
        for j in range(n_steps):
            y = self.step(f, j, h, y)
        return y

    def step(self, f: StepFunction, j: int, h: float, y: torch.Tensor) -> torch.Tensor:
        """One step from y_j to y_{j+1}."""
        ks = []
        for a_i in self.a:
            y_i = y
            for a_ij, k in zip(a_i, ks):
                if a_ij != 0.0:
                    y_i = y_i + (h * a_ij) * k
            ks.append(f(j, y_i))
        out = y
        for b_i, k in zip(self.b, ks):
            if b_i != 0.0:
                out = out + (h * b_i) * k
        return out


INTEGRATORS: Registry[type[AbstractIntegrator]] = Registry("integrator")


@INTEGRATORS.register("euler")
class Euler(ExplicitRungeKutta):
    """Forward Euler, y_{j+1} = y_j + h F(y_j; theta_j): the ResNet. Order 1.

    He et al. 2016 with step size h = T/N (Haber et al. 2018, eq. 3).
    """

    name = "euler"
    order = 1
    stages = 1
    a = ((),)
    b = (1.0,)

    def step(self, f: StepFunction, j: int, h: float, y: torch.Tensor) -> torch.Tensor:
        # A fast path, not a different method: the tableau's general step gives the same y + h k_1
        # with one more tensor per step (the ResNet, msnet's default, runs through here).
        return y + h * f(j, y)


@INTEGRATORS.register("rk2")
class Heun(ExplicitRungeKutta):
    """Heun's method (explicit trapezoidal rule), order 2. Hairer-Norsett-Wanner, Table II.1.1."""

    name = "rk2"
    order = 2
    stages = 2
    a = ((), (1.0,))
    b = (0.5, 0.5)


@INTEGRATORS.register("rk4")
class ClassicRK4(ExplicitRungeKutta):
    """The classical fourth-order Runge-Kutta method (Kutta 1901). Hairer-Norsett-Wanner, Table II.1.2."""

    name = "rk4"
    order = 4
    stages = 4
    a = ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0))
    b = (1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0)

"""Linear multistep integrators: the LM-architecture of Lu, Zhong, Li & Dong (ICML 2018).

Lu et al., "Beyond Finite Layer Neural Networks: Bridging Deep Architectures and
Numerical Differential Equations", ICML 2018, arXiv:1710.10121, Sec. 2.2, propose

    u_{n+1} = (1 - k_n) u_n + k_n u_{n-1} + F(u_n)

with one learnable scalar k_n per layer. In msnet's ODE form the step size h = T/N
is written out, so that k_n = 0 is exactly the forward-Euler ResNet step:

    u_{n+1} = u_n - k_n (u_n - u_{n-1}) + h F(u_n; theta_n).

A two-step scheme is fixed by its characteristic polynomials (Hairer, Norsett,
Wanner, *Solving ODEs I*, sec. III.2): for steps y_{n+j}, j = 0..s,
rho(z) = sum_j alpha_j z^j and sigma(z) = sum_j beta_j z^j. They are kept as data
(:meth:`LinearMultistep.coefficients`) and the order follows from them
(:func:`lmm_order`), so the docstring's claims are computed, not asserted.
"""

from __future__ import annotations

from fractions import Fraction
from typing import ClassVar, Dict, Sequence, Tuple

import torch

from msnet.core.integrators import INTEGRATORS, AbstractIntegrator, StepFunction
from msnet.core.residual import Params

Coefficients = Tuple[Tuple[float, ...], Tuple[float, ...]]


def lmm_order(alpha: Sequence[float], beta: Sequence[float], max_order: int = 8) -> int:
    """Order p of the linear multistep method sum_j alpha_j y_{n+j} = h sum_j beta_j f_{n+j}.

    ``alpha`` and ``beta`` are listed from the oldest step (j = 0) to the newest (j = s).
    p is the largest q with C_0 = ... = C_q = 0, where C_0 = sum alpha_j and
    C_q = sum_j alpha_j j^q / q! - sum_j beta_j j^(q-1) / (q-1)!  (Hairer-Norsett-Wanner,
    Thm. III.2.4). 0 means inconsistent. Exact rational arithmetic, so ``alpha`` and
    ``beta`` should be exact in binary (``0.25``, ``1.0``, not ``0.1``).
    """
    a = [Fraction(x) for x in alpha]
    b = [Fraction(x) for x in beta]
    if sum(a) != 0:
        return 0
    factorial = 1
    for q in range(1, max_order + 1):
        factorial_prev = factorial
        factorial *= q
        c = sum(aj * Fraction(j**q, factorial) for j, aj in enumerate(a))
        c -= sum(bj * Fraction(j ** (q - 1), factorial_prev) for j, bj in enumerate(b))
        if c != 0:
            return q - 1
    return max_order


@INTEGRATORS.register("lm")
class LinearMultistep(AbstractIntegrator):
    """The LM-architecture, u_{n+1} = u_n - k_n (u_n - u_{n-1}) + h F(u_n), k_n learnable. Order 1.

    Lu, Zhong, Li, Dong, ICML 2018 (arXiv:1710.10121), Sec. 2.2; msnet writes the step
    size h = T/N out, so k_n = 0 for every n is exactly :class:`~msnet.core.integrators.Euler`.

    **Which ODE, which order.** With k_n = k fixed the scheme is the two-step method
    rho(z) = (z - 1)(z + k), sigma(z) = (1 + k) z applied to f = F / (1 + k): a Taylor
    expansion gives the modified equation (1 + k) u' + (1 - k) (h/2) u'' = F(u) (Lu
    et al.'s second-order-ODE reading of the LM-architecture). So for every k in
    (-1, 1] the scheme is consistent, zero-stable (roots 1 and -k) and convergent, to
    the solution of the *time-rescaled* ODE (1 + k) y' = F(y). Its order from the
    conditions C_q of :func:`lmm_order`: C_2 = (1 - k)/2, so the order is 1 for
    k != 1 and 2 only at k = 1, where the method is the explicit midpoint rule
    (leapfrog) y_{n+1} = y_{n-1} + 2h f_n with C_3 = 1/3. At k = -1 the scheme is
    inconsistent (sigma = 0, double root 1), and for |k| > 1 it is unstable. The
    registry fact ``order = 1`` is the order of the learnable family; see
    :meth:`order_at` for a fixed k.

    **First step.** u_1 needs a one-step method. msnet takes forward Euler on the same
    rescaled field, u_1 = u_0 + h F(u_0) / (1 + k_0): its O(h^2) local error keeps the
    k = 1 scheme at order 2, and for k_0 = 0 it is the ResNet step. The authors'
    code (github.com/2prime/LM-ResNet, ``MResNet.py``) makes the first block of every
    stage a plain residual step, u_1 = u_0 + F(u_0), and starts the LM recursion
    afresh in each stage; msnet does the same per stage, and agrees with it when
    k_0 = 0. (A plain step for k_0 != 0 would start an O(h) error that persists and
    caps every k at order 1.)

    **Initialisation.** k_n ~ U[-0.1, 0]. This is the initialisation recalled from the
    paper's CIFAR experiments; the paper's text could not be checked from here, but
    the authors' ``MResNet`` (the model of their stochastic-depth runs) does the same:
    it draws the weight of u_n from U[1.0, 1.1], and that weight is 1 - k_n.

    **Stochastic depth** multiplies h F(u_n) by the step's gate (set up by the
    network, see :class:`~msnet.core.network.ODEBlock`); the k-combination of u_n and
    u_{n-1} is never dropped. That is what ``MResNet.py`` does (the gate wraps the
    residual block only) and how we read Lu et al.'s Sec. 3, where stochastic depth
    on the LM-architecture is u_{n+1} = (1 - k_n) u_n + k_n u_{n-1} + eta_n F(u_n)
    with eta_n ~ Bernoulli(p_n).

    Per-step parameter: ``k`` of shape ``()`` per step, ``(N,)`` stacked, dimensionless.
    """

    name = "lm"
    order = 1
    reversible = False
    history = 2
    stages = 1
    per_step_params = True
    k_init: ClassVar[Tuple[float, float]] = (-0.1, 0.0)

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """One scalar k per step."""
        return {"k": ()}

    def init_(self, params: Params) -> None:
        """k_n ~ U[-0.1, 0] independently per step (Lu et al. 2018; see the class docstring)."""
        with torch.no_grad():
            params["k"].uniform_(*self.k_init)

    @staticmethod
    def coefficients(k: float) -> Coefficients:
        """(alpha, beta) of the fixed-k scheme as a method for f = F / (1 + k), oldest step first.

        alpha = (-k, -(1 - k), 1) for (y_{n-1}, y_n, y_{n+1}); beta = (0, 1 + k, 0).
        """
        return (-k, -(1.0 - k), 1.0), (0.0, 1.0 + k, 0.0)

    @classmethod
    def order_at(cls, k: float) -> int:
        """Order of convergence to (1 + k) y' = F(y) for a fixed k; 0 where not convergent (|k| > 1 or k = -1)."""
        if not -1.0 < k <= 1.0:
            return 0
        return lmm_order(*cls.coefficients(k))

    def integrate(self, f: StepFunction, y0: torch.Tensor, h: float, n_steps: int, params: Params) -> torch.Tensor:
        """Return u_N from u_0 ``(B, C, H, W)``: one Euler start step, then N - 1 LM steps."""
        k = params["k"]
        u_prev = y0
        u = y0 + (h / (1.0 + k[0])) * f(0, y0)
        for j in range(1, n_steps):
            # u + hF first, so that k_j = 0 gives Euler's u + hF bit for bit.
            u, u_prev = u + h * f(j, u) - k[j] * (u - u_prev), u
        return u

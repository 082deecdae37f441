"""Prolongation and restriction in time of per-step parameters (shallow-to-deep training).

An N-step block over [0, T] has step size h = T/N; its j-th parameter slice acts on
[t_j, t_{j+1}) and is read as the value of theta(t) at the left end t_j = j h
(:meth:`msnet.core.ODEBlock.time_grid`). Moving to M steps keeps T and samples a
function of t at the new left ends t'_i = i T/M:

* ``linear`` (the paper's choice, the default): the piecewise-linear interpolant of
  (t_j, theta_j); past the last sample t_{N-1} (on (t_{N-1}, T)) it is held constant,
  since there is no theta_N to interpolate towards. N -> 2N keeps every old slice at the
  even new steps and puts the mean of neighbours at the odd ones (the last odd step
  repeats theta_{N-1}).
* ``constant``: piecewise-constant, theta'_i = theta_j for t'_i in [t_j, t_{j+1}).

Restrictions M -> N (N dividing M): ``injection`` takes theta'_{i} at i = j M/N (exactly
the old samples after either prolongation, so restrict(prolong(theta)) == theta), and
``average`` takes the mean of the M/N fine slices in [t_j, t_{j+1}) (exact after the
piecewise-constant prolongation only).

Haber, Ruthotto, Holtham, Jun, "Learning across scales", AAAI 2018, Sec. 3 ("From
shallow to deep networks"); Chang et al., "Multi-level residual networks from
dynamical systems view", ICLR 2018.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict

import torch

from msnet.errors import MsnetError
from msnet.registry import Registry

if TYPE_CHECKING:
    from msnet.core import ODEResNet

TimeOperator = Callable[[torch.Tensor, int], torch.Tensor]
"""``op(theta, m)``: per-step tensor ``(N, *shape)`` -> ``(m, *shape)`` over the same [0, T]."""

TIME_PROLONGATIONS: Registry[TimeOperator] = Registry("time prolongation")
TIME_RESTRICTIONS: Registry[TimeOperator] = Registry("time restriction")


@TIME_PROLONGATIONS.register("linear")
def prolong_linear(theta: torch.Tensor, m: int) -> torch.Tensor:
    """Piecewise-linear interpolation in t of the left-end samples, constant past t_{N-1}."""
    n = theta.shape[0]
    pos = torch.arange(m, dtype=torch.float64) * n / m  # new left ends in units of the old h
    j = pos.floor().long().clamp(max=n - 1)
    w = (pos - j).clamp(0, 1)
    nxt = (j + 1).clamp(max=n - 1)
    w = torch.where(j + 1 > n - 1, torch.zeros_like(w), w).to(theta.dtype).to(theta.device)
    shape = (m,) + (1,) * (theta.dim() - 1)
    return theta[j] * (1 - w).view(shape) + theta[nxt] * w.view(shape)


@TIME_PROLONGATIONS.register("constant")
def prolong_constant(theta: torch.Tensor, m: int) -> torch.Tensor:
    """theta'_i = theta_j for the old step j whose interval holds t'_i."""
    n = theta.shape[0]
    j = (torch.arange(m, dtype=torch.float64) * n / m).floor().long().clamp(max=n - 1)
    return theta[j].clone()


def _ratio(theta: torch.Tensor, n: int) -> int:
    m = theta.shape[0]
    if n < 1 or m % n:
        raise MsnetError(f"cannot restrict {m} steps to {n}: the coarse depth must divide the fine one")
    return m // n


@TIME_RESTRICTIONS.register("injection")
def restrict_injection(theta: torch.Tensor, n: int) -> torch.Tensor:
    """theta_j = theta'_{j M/N}: the fine slice that starts where the coarse step starts."""
    return theta[:: _ratio(theta, n)].clone()


@TIME_RESTRICTIONS.register("average")
def restrict_average(theta: torch.Tensor, n: int) -> torch.Tensor:
    """theta_j = mean of the M/N fine slices inside [t_j, t_{j+1})."""
    r = _ratio(theta, n)
    return theta.reshape(n, r, *theta.shape[1:]).mean(dim=1)


def prolong_in_time(params: Dict[str, torch.Tensor], m: int, op: str = "linear") -> Dict[str, torch.Tensor]:
    """Every per-step tensor of a stage moved to ``m`` steps with prolongation ``op``."""
    f = TIME_PROLONGATIONS.get(op)
    return {k: f(v.detach(), m) for k, v in params.items()}


def restrict_in_time(params: Dict[str, torch.Tensor], n: int, op: str = "injection") -> Dict[str, torch.Tensor]:
    """Every per-step tensor of a stage moved to ``n`` steps with restriction ``op``."""
    f = TIME_RESTRICTIONS.get(op)
    return {k: f(v.detach(), n) for k, v in params.items()}


def smooth_in_time_(model: "ODEResNet", knots: int, op: str = "linear") -> None:
    """Make every stage's per-step parameters, in place, a function of t known at ``knots`` points (the time-smooth
    initialisation, ``model.init_knots``).

    The stage's own draw is restricted by injection to ``knots`` steps (independent draws at the left ends
    t = i T / knots) and prolonged back to its N steps with ``op``: with ``linear``, the piecewise-linear
    interpolant of those draws, so a coarse-in-time level (N / 2^k steps, ``knots`` dividing it) represents
    the start exactly, and ``knots = 1`` makes every step the same. The interpolant's values are convex
    combinations of the draws, so no step's stencil norm grows (a stage that met its step-size condition still
    does). A stage with ``knots >= N`` steps is left as drawn; ``knots`` must divide every shorter stage's N.
    """
    with torch.no_grad():
        for block in model.blocks:
            n = block.layers
            check_knots(knots, n)
            if knots >= n:
                continue
            params = block.step_parameters()
            fine = prolong_in_time(restrict_in_time(params, knots, "injection"), n, op)
            for name, value in params.items():
                value.copy_(fine[name])


def check_knots(knots: int, n: int) -> None:
    """``model.init_knots`` fits a stage of ``n`` steps: at least 1, and a divisor of ``n`` when below it."""
    if knots < 1:
        raise MsnetError(f"model.init_knots must be at least 1 (got {knots}), or null to draw every step")
    if knots < n and n % knots:
        best = max(d for d in range(1, knots + 1) if n % d == 0)
        raise MsnetError(f"model.init_knots={knots} must divide the {n} steps the network starts with; "
                         f"use a divisor such as model.init_knots={best}, or null to draw every step")


MOMENT_POWERS = {"exp_avg": 1, "momentum_buffer": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}
"""The per-parameter optimiser buffers a depth move carries, and the power of the gradient each one scales with
(Adam/AdamW's first and second moments, AMSGrad's maximum, SGD's momentum)."""


def prolong_optimizer_state(old_opt: torch.optim.Optimizer, old_model: torch.nn.Module,
                            new_opt: torch.optim.Optimizer, new_model: torch.nn.Module, op: str = "linear") -> int:
    """Carry ``old_opt``'s per-parameter state to ``new_opt`` after ``old_model`` was moved to more steps in time
    (``new_model``, same parameter names), instead of starting the optimiser fresh (``depth.carry_optimizer``).

    A per-step tensor ``(N, ...)`` moved to ``M`` steps has its buffers moved with the same prolongation ``op``,
    each scaled for the new step size: the gradient with respect to a step's parameters carries a factor h
    (y_{j+1} = y_j + h F(y_j; theta_j)), so a first moment scales by N / M and a second by (N / M)^2
    (:data:`MOMENT_POWERS`); Adam's update m / sqrt(v) is unchanged by the scaling, its memory of the gradient's
    size stays right for the new one. Parameters of the same shape (opening, classifier) keep their state as it
    is; the step count goes with them. Returns the number of parameters whose state was carried; ``new_opt``
    must be the same kind of optimiser, with no state yet.
    """
    if type(old_opt) is not type(new_opt):
        raise MsnetError(f"cannot carry {type(old_opt).__name__}'s state into {type(new_opt).__name__}")
    old = dict(old_model.named_parameters())
    carried = 0
    with torch.no_grad():
        for name, p in new_model.named_parameters():
            q = old.get(name)
            if q is None or q not in old_opt.state:
                continue
            same = q.shape == p.shape
            if not same and (q.shape[1:] != p.shape[1:] or p.shape[0] % q.shape[0]):
                raise MsnetError(f"cannot carry the optimiser state of {name}: {tuple(q.shape)} -> {tuple(p.shape)} "
                                 f"is not a move to more steps in time")
            ratio = q.shape[0] / p.shape[0]
            state = {}
            for key, value in old_opt.state[q].items():
                if key in MOMENT_POWERS and torch.is_tensor(value) and value.shape == q.shape and not same:
                    value = TIME_PROLONGATIONS.get(op)(value, p.shape[0]) * ratio ** MOMENT_POWERS[key]
                state[key] = value.clone() if torch.is_tensor(value) else value
            new_opt.state[p] = state
            carried += 1
    return carried

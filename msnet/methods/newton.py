"""Matrix-free second-order tools for the softmax cross-entropy: CG, Gauss–Newton products, Newton–CG.

The training objective of a block of parameters theta (the others held fixed) is

    J(theta) = (1/B) sum_i CE(f_i(theta), y_i) + R(theta) + (lambda_wd / 2) ||theta||^2

with logits f(theta) ``(B, classes)`` and a regulariser R that is quadratic in theta (the
paper's smoothness terms, :mod:`msnet.methods.regularizers`). Its Gauss–Newton matrix is

    G = J_f^T H_CE J_f + grad^2 R + lambda_wd I,     H_CE = (diag(p_i) - p_i p_i^T) / B per sample,

with p_i the softmax of f_i. G is symmetric positive semi-definite (H_CE is), so conjugate
gradients apply. It is never formed: :class:`GaussNewton` applies J_f^T u with one
reverse-mode pass through a graph recorded once, and J_f v either by reverse-over-reverse
differentiation of that graph (the default) or by forward mode (``torch.func.jvp``).
Where f is affine in theta (a classifier on fixed features) G is the exact Hessian, so
Newton–CG (:func:`newton_cg`) converges quadratically near the optimum when the CG tolerance
shrinks with the gradient (forcing term eta_k = min(1/2, ||g_k||); Eisenstat & Walker 1996,
Nocedal & Wright 2006, Thm. 7.2).

Vectors are lists of tensors shaped like the parameters they belong to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

Vec = List[torch.Tensor]
Operator = Callable[[Vec], Vec]


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_k <a_k, b_k>, a 0-d tensor."""
    return sum((x * y).sum() for x, y in zip(a, b))


def axpy(alpha: float, x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> Vec:
    """alpha x + y."""
    return [yi.add(xi, alpha=alpha) for xi, yi in zip(x, y)]


def softmax_ce_hessian_product(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """H_CE u for the batch-mean cross-entropy: ``(p * u - p (p . u)) / B`` row by row.

    ``probs``: softmax of the logits ``(B, K)``; ``u``: a direction in logit space ``(B, K)``.
    """
    pu = probs * u
    return (pu - probs * pu.sum(dim=1, keepdim=True)) / probs.shape[0]


class GaussNewton:
    """v -> J^T H_CE J v for logits = ``logits_fn(params)`` ``(B, K)``, at ``primals``.

    ``logits_fn`` takes a dict name -> tensor (e.g. ``functional_call(net, p, (x,))``).
    Building it runs one forward pass and keeps its graph; ``products`` counts the products.

    ``mode`` says how J v is formed:

    * ``"vjp"`` (default): reverse over reverse. With u a dummy ``(B, K)`` leaf,
      w(u) = J^T u is linear in u, so J v = d(w(u) . v)/du: one backward pass over the
      graph of the first backward (recorded once, ``create_graph``), then J^T (H J v) over
      the forward graph. Every op of the network must be twice differentiable.
    * ``"jvp"``: forward mode, ``torch.func.jvp`` (a fresh forward pass with tangents), then
      the same J^T. Measured on this project's CPU (torch 2.14, 8 channels, 28x28): the
      forward-mode convolution is about 10x a plain forward pass, so a product costs
      about 5x what ``"vjp"``'s does; kept as an independent check.
    """

    MODES = ("vjp", "jvp")

    def __init__(self, logits_fn: Callable[[Dict[str, torch.Tensor]], torch.Tensor],
                 primals: Dict[str, torch.Tensor], mode: str = "vjp"):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.names, self.mode, self._fn = list(primals), mode, logits_fn
        self.products = 0
        if mode == "jvp":
            self._primals = {k: v.detach() for k, v in primals.items()}
            logits, self._vjp = torch.func.vjp(logits_fn, self._primals)
        else:
            leaves = {k: v.detach().requires_grad_(True) for k, v in primals.items()}
            self._leaves = list(leaves.values())
            with torch.enable_grad():
                self._logits = logits_fn(leaves)
                self._u = torch.zeros_like(self._logits, requires_grad=True)
                self._w = torch.autograd.grad(self._logits, self._leaves, self._u, create_graph=True,
                                              allow_unused=True)
            logits = self._logits.detach()
        self.probs = torch.softmax(logits.detach(), dim=1)

    def jacobian_product(self, v: Vec) -> torch.Tensor:
        """J v, ``(B, K)``."""
        if self.mode == "jvp":
            return torch.func.jvp(self._fn, (self._primals,), (dict(zip(self.names, v)),))[1]
        pairs = [(w, vi) for w, vi in zip(self._w, v) if w is not None and w.requires_grad]
        (jv,) = torch.autograd.grad([w for w, _ in pairs], self._u, [vi for _, vi in pairs], retain_graph=True)
        return jv

    def transpose_product(self, u: torch.Tensor) -> Vec:
        """J^T u for u ``(B, K)``."""
        if self.mode == "jvp":
            (out,) = self._vjp(u)
            return [out[k] for k in self.names]
        out = torch.autograd.grad(self._logits, self._leaves, u, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if o is None else o for p, o in zip(self._leaves, out)]

    def __call__(self, v: Vec) -> Vec:
        self.products += 1
        return self.transpose_product(softmax_ce_hessian_product(self.probs, self.jacobian_product(v)))


class QuadraticHessian:
    """v -> grad^2 R v for a penalty ``R()`` that is quadratic in ``params`` (a constant matrix).

    ``penalty`` reads the live parameters (as :func:`msnet.methods.regularizers.build_regularizer`'s
    closure does); ``None`` is R = 0. Parameters R does not depend on get 0. Build it again
    after changing the parameters in place (autograd's saved values would be stale).
    """

    def __init__(self, penalty: Optional[Callable[[], torch.Tensor]], params: Sequence[torch.Tensor]):
        self.params = list(params)
        self._grads: List[torch.Tensor] = []
        self._vidx: List[int] = []
        if penalty is None:
            return
        with torch.enable_grad():
            value = penalty()
            if not (isinstance(value, torch.Tensor) and value.requires_grad):
                return
            grads = torch.autograd.grad(value, self.params, create_graph=True, allow_unused=True)
        for i, g in enumerate(grads):
            if g is not None and g.requires_grad:
                self._grads.append(g)
                self._vidx.append(i)

    def __call__(self, v: Vec) -> Vec:
        if not self._grads:
            return [torch.zeros_like(p) for p in self.params]
        out = torch.autograd.grad(self._grads, self.params, grad_outputs=[v[i] for i in self._vidx],
                                  retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if o is None else o for p, o in zip(self.params, out)]


@dataclass
class CGResult:
    """An approximate solution ``x`` of A x = b, with ``Ax`` = A x from the recurrence (b - r).

    ``iters``: products with A taken; ``rel_residual`` ||b - A x|| / ||b||;
    ``curvature_stop``: CG met a direction with p^T A p <= 0 and stopped there (with
    x = b if that happened first, the steepest-descent direction of the quadratic model).
    """

    x: Vec
    Ax: Vec
    iters: int
    rel_residual: float
    curvature_stop: bool = False


def conjugate_gradient(apply_A: Operator, b: Vec, max_iters: int, rtol: float = 0.0) -> CGResult:
    """Solve A x = b for symmetric positive semi-definite A from x_0 = 0 (Hestenes & Stiefel 1952).

    Stops after ``max_iters`` products or when ||r|| <= ``rtol`` ||b||. Because x_0 = 0 the
    iterates decrease the quadratic model q(x) = -b^T x + x^T A x / 2 monotonically, so a
    truncated solve is still a descent direction for q.
    """
    x = [torch.zeros_like(bi) for bi in b]
    r = [bi.clone() for bi in b]
    p = [bi.clone() for bi in b]
    rr = float(dot(r, r))
    bnorm = math.sqrt(rr)
    if bnorm == 0.0 or max_iters < 1:
        return CGResult(x, [torch.zeros_like(bi) for bi in b], 0, 0.0 if bnorm == 0.0 else 1.0)
    iters = 0
    for k in range(max_iters):
        Ap = apply_A(p)
        iters += 1
        pAp = float(dot(p, Ap))
        if not pAp > 0.0:
            if k == 0:
                return CGResult(p, Ap, iters, 1.0, curvature_stop=True)
            return CGResult(x, [bi - ri for bi, ri in zip(b, r)], iters, math.sqrt(rr) / bnorm, curvature_stop=True)
        alpha = rr / pAp
        x = axpy(alpha, p, x)
        r = axpy(-alpha, Ap, r)
        rr_new = float(dot(r, r))
        if math.sqrt(rr_new) <= rtol * bnorm:
            rr = rr_new
            break
        p = axpy(rr_new / rr, p, r)
        rr = rr_new
    return CGResult(x, [bi - ri for bi, ri in zip(b, r)], iters, math.sqrt(rr) / bnorm)


@dataclass
class NewtonReport:
    """What :func:`newton_cg` did: objective values before each step and at the end, per-step
    gradient norms, CG iterations and accepted step lengths (0: the line search failed and
    the solve stopped there)."""

    objectives: List[float] = field(default_factory=list)
    grad_norms: List[float] = field(default_factory=list)
    cg_iters: List[int] = field(default_factory=list)
    steps: List[float] = field(default_factory=list)
    backtracks: int = 0

    @property
    def total_cg_iters(self) -> int:
        return sum(self.cg_iters)


def cross_entropy_objective(
    logits: torch.Tensor, y: torch.Tensor, penalty: Optional[Callable[[], torch.Tensor]],
    weight_decay: float, params: Sequence[torch.Tensor],
) -> torch.Tensor:
    """J = mean CE(logits, y) + R() + (weight_decay / 2) sum ||p||^2 over ``params``, a 0-d tensor."""
    obj = F.cross_entropy(logits, y)
    if penalty is not None:
        obj = obj + penalty()
    if weight_decay:
        obj = obj + 0.5 * weight_decay * sum(p.pow(2).sum() for p in params)
    return obj


def armijo(
    params: Sequence[torch.Tensor], direction: Vec, objective: Callable[[], float], f0: float, slope: float,
    step: float, c1: float, backtrack: float, max_backtracks: int,
) -> tuple[float, float, int]:
    """Backtracking line search on the live ``params`` along ``direction`` (in place).

    Tries theta_0 + a d for a = step, step*backtrack, ..., accepting the first with
    J <= f0 + c1 a slope (``slope`` = g^T d < 0). Returns ``(a, J(theta_0 + a d), backtracks)``;
    when no trial is accepted the parameters are put back and ``a = 0``, ``J = f0``.
    ``objective()`` evaluates J at the live parameters (no gradient needed).
    """
    theta0 = [p.detach().clone() for p in params]
    a = step
    for k in range(max_backtracks + 1):
        with torch.no_grad():
            for p, t0, d in zip(params, theta0, direction):
                p.copy_(t0.add(d, alpha=a))
        f = objective()
        if math.isfinite(f) and f <= f0 + c1 * a * slope:
            return a, f, k
        a *= backtrack
    with torch.no_grad():
        for p, t0 in zip(params, theta0):
            p.copy_(t0)
    return 0.0, f0, max_backtracks + 1


def newton_cg(
    module: torch.nn.Module, inputs: torch.Tensor, y: torch.Tensor, steps: int, cg_iters: int,
    penalty: Optional[Callable[[], torch.Tensor]] = None, weight_decay: float = 0.0,
    all_params: Optional[Sequence[torch.Tensor]] = None, c1: float = 1e-4, backtrack: float = 0.5,
    max_backtracks: int = 10,
) -> NewtonReport:
    """Inexact Newton–CG on ``module``'s own parameters for J(module(inputs), y), in place.

    Meant for a classifier on fixed features ``inputs`` (``(B, C, H, W)``, no gradient): the
    logits are affine in its parameters, so the Gauss–Newton matrix is the exact Hessian of J
    and the problem is convex. Each of ``steps`` steps solves G d = -g by CG up to
    ||r|| <= min(1/2, ||g||) ||g|| or ``cg_iters`` products, then takes an Armijo step from a = 1.
    ``penalty`` and ``weight_decay`` are the regulariser and L2 weight of J;
    ``all_params`` are the parameters the weight decay covers in the reported J (default: the
    module's), so its values agree with the whole network's objective.
    """
    params = list(module.parameters())
    names = [n for n, _ in module.named_parameters()]
    decay_params = params if all_params is None else list(all_params)
    report = NewtonReport()

    def objective() -> float:
        with torch.no_grad():
            return float(cross_entropy_objective(module(inputs), y, penalty, weight_decay, decay_params))

    for _ in range(steps):
        with torch.enable_grad():
            obj = cross_entropy_objective(module(inputs), y, penalty, weight_decay, decay_params)
            g = list(torch.autograd.grad(obj, params))
        f0 = float(obj.detach())
        gnorm = math.sqrt(float(dot(g, g)))
        report.objectives.append(f0)
        report.grad_norms.append(gnorm)
        if gnorm == 0.0:
            break
        gn = GaussNewton(lambda c: torch.func.functional_call(module, c, (inputs,)),
                         {n: p for n, p in zip(names, params)})
        reg = QuadraticHessian(penalty, params)

        def apply(v: Vec) -> Vec:
            out = axpy(1.0, gn(v), reg(v))
            return axpy(weight_decay, v, out) if weight_decay else out

        cg = conjugate_gradient(apply, [-gi for gi in g], cg_iters, rtol=min(0.5, gnorm))
        slope = float(dot(g, cg.x))
        report.cg_iters.append(cg.iters)
        a, f, back = armijo(params, cg.x, objective, f0, slope, 1.0, c1, backtrack, max_backtracks)
        report.steps.append(a)
        report.backtracks += back
        if a == 0.0:
            break
    report.objectives.append(objective())
    return report

"""Reversible backprop: a stage's backward rebuilds its states from the last one instead of storing them.

Chang, Meng, Haber, Ruthotto, Begert, Holtham, "Reversible architectures for arbitrarily deep
residual neural networks", AAAI 2018 (arXiv:1709.03698). :func:`odeint_scheme` with
``backprop="reversible"`` runs a stage of a reversible scheme (:mod:`msnet.core.schemes`) in a
custom :class:`torch.autograd.Function` that keeps only the final state (two tensors) and the
parameters. Backward walks the steps from last to first: for each sub-step it evaluates F_part
once with autograd on (the source state and step j's parameter slices), undoes the sub-step with
that value, and pulls the gradient back through it with one vector-Jacobian product. So a step
costs one extra residual evaluation over ordinary backprop (about 4/3 of its time), and the
activation memory of a stage does not grow with its depth. The states used for the gradient are
rebuilt ones: they agree with the stored states to round-off, so gradients agree with
``backprop="store"`` to the same level (measured: docs/results.md). A scheme is only as reversible
as its inverse is stable: midpoint on a field with real eigenvalues amplifies round-off backward
as it amplifies data forward. Double backward is not supported.

**Precision** (:class:`PrecisionState`). Rebuilding subtracts the very F value the forward added
only if backward evaluates F in the forward's arithmetic, so the backward replays the forward's
autocast state (autograd runs it outside the caller's autocast) and, on CUDA, both run their
convolutions in IEEE float32 whatever the global TF32 flag says, unless ``tf32=True``
(``trainer.reversible_tf32``; TF32 rounds to ~5e-4, and a kernel in backward that differs from
the forward's by that much leaves it in every rebuilt state). Under autocast the state of a
scheme stage stays in the parameters' dtype (float32) for both backprops and only F runs in
bfloat16 (:func:`state_dtype`): a bf16 state cannot be rebuilt (each sub-step's rounding is
lost) and drops updates below 2^-9 |y| (its error: docs/results.md, tests/test_precision.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from msnet.core.device import ieee_fp32_convolutions
from msnet.core.integrators import AbstractIntegrator
from msnet.core.residual import AbstractResidual
from msnet.core.schemes import ReversibleScheme, residual_evaluator


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

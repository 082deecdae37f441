"""Step-size conditions of the reversible schemes, and the checks that an integrator can step a residual.

Each scheme is stable only on fields of one structure, and then only for h small enough (the frozen
linearisation e' = J e, J = dF/dy): the midpoint rule and symplectic Euler need purely imaginary
eigenvalues of J, with h rho(J) < 1 and < 2; leapfrog for Y'' = F(Y) needs J symmetric negative
semi-definite, with h^2 rho(J) < 4 (Chang et al. 2018, arXiv:1709.03698; the root conditions are
in the schemes' docstrings, :mod:`msnet.core.schemes`). The integrators declare this
(``stable_for``, ``step_limit``, ``step_power``) and the residuals their structure (``spectrum``)
and a bound rho_j on rho(J) from step j's stencils (``spectral_bounds``). :func:`step_ratios`
compares the two; a new block scales each step's stencils so that its ratio is at most 1/2
(:func:`stabilise_`), so a network starts stable at every state whatever h its preset has.

The bound assumes sigma' = 1 everywhere, so training may leave it behind while the states stay
bounded (measured: docs/results.md); ``model.step_bound`` keeps it, by the same projection after
every update (``ODEResNet.bound_steps_``). On a field of the wrong structure no step size is stable:
the midpoint rule on the plain sigma(K Y + b) (``conv_act``), whose real eigenvalues excite the
parasitic root. That pairing stays available for comparison, and :func:`scheme_note` says so in one
line when a run uses it. Why the midpoint rule is stable on ``conv_antisym``: docs/methods/reversible.md.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from msnet.errors import MsnetError
from msnet.core.integrators import INTEGRATORS, AbstractIntegrator
from msnet.core.residual import RESIDUALS, AbstractResidual, Params
from msnet.core.schemes import BACKPROPS

INIT_STEP_RATIO = 0.5
"""A new block's steps start at most this far along their stability limit (:func:`stabilise_`)."""


def step_ratios(integrator: AbstractIntegrator, residual: AbstractResidual, params: Params,
                h: float, memory: Optional[Dict[str, torch.Tensor]] = None) -> Optional[torch.Tensor]:
    """h^p rho_j / step_limit for each step j of stacked ``params`` ``(N, *shape)``: ``(N,)``, float64.

    Below 1 the frozen linearised step j is stable (the integrator's condition, with rho_j the
    residual's bound on rho(J)). None where no condition applies: the integrator states none,
    the residual's spectrum is not one the scheme is stable on (:func:`scheme_note`; no h helps
    there), or the residual has no bound. ``memory``: warm-started norm estimates
    (:func:`~msnet.core.residual.conv_norm`).
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

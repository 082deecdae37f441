"""Coarser-in-time hierarchies of a network, shared by the multilevel update rules.

``trainer=mgopt`` (:mod:`msnet.methods.mgopt`) and ``trainer=rmtr`` (:mod:`msnet.methods.rmtr`)
train an ODE-ResNet through copies of it with fewer time steps over the same T: level
l = 1..L (L finest, the network being trained) has N_l = N_L / 2^(L-l) steps per stage. This
module holds what both build the same way: the depths of the levels (:func:`coarse_depths`),
the coarse networks and their parameters (:func:`hierarchy_parts`), the transfer matrices
between neighbouring levels (:func:`build_transfers`; R for variables, P for corrections, G for
gradients, their meaning in :mod:`msnet.methods.mgopt`'s docstring), a level's objective with its
coherence term (:class:`HierarchyLevel`) and the first-order coherent coarse model
(:func:`couple_coarse`).

Only the per-step tensors of the stages (``block.step_parameters()``) live on a time grid and are
moved between levels; the opening layer, the connectives and the classifier are the same variables
on every level (identity transfer), each coarse network holding its own copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from msnet.errors import MsnetError
from msnet.core import ODEResNet
from msnet.multigrid import transfer_depth
from msnet.multigrid.time import TIME_PROLONGATIONS, TIME_RESTRICTIONS
from msnet.methods.regularizers import build_regularizer
from msnet.methods.base import Penalty


def coarse_depths(depths: List[int], levels: int) -> List[List[int]]:
    """Steps per stage on every level, coarsest first: N_l = N_L / 2^(L-l).

    Fails with one line when a stage's depth is not divisible by 2^(L-1).
    """
    factor = 2 ** (levels - 1)
    bad = [n for n in depths if n % factor or n // factor < 1]
    if bad:
        raise MsnetError(
            f"trainer.levels={levels} halves every stage's {depths} steps {levels - 1} time(s), so each needs a "
            f"multiple of {factor} steps; use model.layers={factor * max(1, math.ceil(max(depths) / factor))} "
            f"or trainer.levels={_max_levels(depths)}"
        )
    return [[n // 2 ** (levels - 1 - i) for n in depths] for i in range(levels)]


def nested_settings(settings: Any, model: ODEResNet, final_layers: int) -> Any:
    """``settings`` for a multilevel rule built on ``model``: under a depth cascade (nested iteration, the F-cycle),
    a network shallower than the final ``final_layers`` steps per stage gets at most the levels its depth allows
    (``trainer.levels=6`` at 16 layers: 5 levels, 1 to 16 steps), as a coarse problem of the final hierarchy should;
    the final depth keeps ``trainer.levels`` and its one-line error if it cannot halve that often."""
    now = model.depth()
    if max(now) >= final_layers or settings.levels <= _max_levels(now):
        return settings
    return replace(settings, levels=_max_levels(now))


def _max_levels(depths: List[int]) -> int:
    levels = 1
    while all(n % 2 ** levels == 0 for n in depths):
        levels += 1
    return levels


def time_matrix(kind: str, op: str, n_from: int, n_to: int) -> torch.Tensor:
    """The ``(n_to, n_from)`` float64 matrix of a registered time operator (``kind`` = prolong|restrict).

    The operators of :mod:`msnet.multigrid.time` are linear along the step axis, so applying one
    to the identity gives its matrix; a per-step tensor ``(n_from, *shape)`` is then moved by
    ``tensordot(M, theta, dims=1)``.
    """
    f = (TIME_PROLONGATIONS if kind == "prolong" else TIME_RESTRICTIONS).get(op)
    return f(torch.eye(n_from, dtype=torch.float64), n_to)


def move(matrices: List[torch.Tensor], stage: Optional[int], t: torch.Tensor) -> torch.Tensor:
    """``t`` moved along its step axis by the matrix of its ``stage``; a shared variable (stage None) as it is."""
    return t if stage is None else torch.tensordot(matrices[stage], t, dims=1)


@dataclass
class Transfer:
    """Matrices between level i-1 (coarse) and level i (fine), one per stage each."""

    R: List[torch.Tensor]  # (N_c, N_f): variables fine -> coarse
    P: List[torch.Tensor]  # (N_f, N_c): corrections coarse -> fine
    G: List[torch.Tensor]  # (N_c, N_f): gradients fine -> coarse


def build_transfers(depths: List[List[int]], restriction: str, prolongation: str, gradient_restriction: str,
                    like: torch.Tensor) -> List[Optional[Transfer]]:
    """``transfers[i]`` between levels i-1 and i (``transfers[0]`` is None), in ``like``'s dtype and device.

    G is P^T (``gradient_restriction=transpose``) or (N_f / N_c) R (``scaled``).
    """
    transfers: List[Optional[Transfer]] = [None]
    for coarse, fine in zip(depths[:-1], depths[1:]):
        R = [time_matrix("restrict", restriction, nf, nc) for nc, nf in zip(coarse, fine)]
        P = [time_matrix("prolong", prolongation, nc, nf) for nc, nf in zip(coarse, fine)]
        G = ([p.T.contiguous() for p in P] if gradient_restriction == "transpose"
             else [r * (nf / nc) for r, nc, nf in zip(R, coarse, fine)])
        R, P, G = ([m.to(dtype=like.dtype, device=like.device) for m in ms] for ms in (R, P, G))
        transfers.append(Transfer(R, P, G))
    return transfers


@dataclass
class HierarchyLevel:
    """One level of the hierarchy: its network, parameters and coherence term.

    ``params`` are the network's parameters in ``named_parameters`` order, ``stage[k]`` the stage
    whose time grid parameter k lives on (None for shared variables; found through
    ``block.step_parameters()``), ``names`` their names, ``tau[k]`` the coherence
    vector v of the level's objective psi = f - <v, x> (None on the finest level and while v is
    being recomputed), ``cost`` N_l / N_L.
    """

    net: ODEResNet
    params: List[nn.Parameter]
    stage: List[Optional[int]]
    names: List[str]
    penalty: Optional[Penalty]
    cost: float
    tau: Optional[List[torch.Tensor]] = None
    grad_evals: int = 0
    forward_evals: int = 0

    def objective(self, xb: torch.Tensor, yb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(psi, data loss, logits)`` at the current weights: psi = CE + penalty - <v, x>."""
        logits = self.net(xb)
        loss = F.cross_entropy(logits, yb)
        psi = loss + self.penalty() if self.penalty is not None else loss
        if self.tau is not None:
            psi = psi - sum((t * p).sum() for t, p in zip(self.tau, self.params))
        return psi, loss, logits

    def gradient(self, xb: torch.Tensor, yb: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """``(psi, loss, logits, grad psi)`` at the current weights; one gradient evaluation."""
        psi, loss, logits = self.objective(xb, yb)
        grads = torch.autograd.grad(psi, self.params, allow_unused=True)
        self.grad_evals += 1
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]
        return psi.detach(), loss.detach(), logits.detach(), grads

    @torch.no_grad()
    def value(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """psi at the current weights, forward only."""
        self.forward_evals += 1
        return self.objective(xb, yb)[0]


def hierarchy_parts(model: ODEResNet, depths: List[List[int]], prolongation: str, restriction: str, reg_cfg: Any,
                    penalty: Optional[Penalty]) -> List[Dict[str, Any]]:
    """The fields of every level's :class:`HierarchyLevel`, coarsest first (``depths`` from :func:`coarse_depths`).

    The finest level is ``model`` itself with ``penalty``; each coarse level is a copy with fewer steps
    (:func:`~msnet.multigrid.transfer_depth`), its own regulariser built from ``reg_cfg``, built once.
    """
    parts: List[Dict[str, Any]] = []
    fine_total = sum(depths[-1])
    for i, d in enumerate(depths):
        finest = i == len(depths) - 1
        net = model if finest else transfer_depth(model, d, prolongation, restriction)
        net.train(model.training)
        names = [n for n, _ in net.named_parameters()]
        if parts and names != parts[0]["names"]:
            raise RuntimeError(f"coarse and fine networks list different parameters: {names}")
        params = [p for _, p in net.named_parameters()]
        stage_of = {id(p): s for s, block in enumerate(net.blocks) for p in block.step_parameters().values()}
        parts.append({"net": net, "params": params, "stage": [stage_of.get(id(p)) for p in params], "names": names,
                      "penalty": penalty if finest else build_regularizer(net, reg_cfg), "cost": sum(d) / fine_total})
    return parts


def check_saved_depths(levels: List[HierarchyLevel], saved: List[Any], method: str, path: Any) -> None:
    """A resumed hierarchy must have the depths it was saved with (``saved``: the checkpoint's per-level depths,
    coarsest first); otherwise one :class:`MsnetError` line naming the fix (``method``: MG/OPT or RMTR)."""
    depths = [lv.net.depth() for lv in levels]
    if saved != depths:
        raise MsnetError(f"checkpoint {path} holds an {method} hierarchy of depths {saved}, "
                         f"this run builds {depths}; keep trainer.levels as saved")


def couple_coarse(fine: HierarchyLevel, coarse: HierarchyLevel, tr: Transfer, g: List[torch.Tensor],
                  xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """Set up the coarse model of ``fine`` at its current weights x_f, whose objective's gradient there is ``g``.

    x_c <- R x_f (shared variables copied) and the coherence term v = grad f_c(R x_f) - G g, so that the
    coarse objective psi_c = f_c - <v, x> has gradient G g at x_c (first-order coherence). One gradient
    evaluation on the coarse level; returns psi_c(x_c) (v included).
    """
    with torch.no_grad():
        for pc, pf, st in zip(coarse.params, fine.params, fine.stage):
            pc.copy_(move(tr.R, st, pf))
    coarse.tau = None
    psi_c, _, _, gc = coarse.gradient(xb, yb)
    with torch.no_grad():
        coarse.tau = [a - move(tr.G, st, b) for a, b, st in zip(gc, g, fine.stage)]
        return psi_c - sum((t * p).sum() for t, p in zip(coarse.tau, coarse.params))

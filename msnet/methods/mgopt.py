"""``trainer=mgopt``: MG/OPT multilevel minimisation through coarser-in-time networks.

Gaedke-Merzhäuser, Kopaničáková, Krause, "Multilevel minimization for deep residual networks"
(2020) train a ResNet, read as the forward-Euler discretisation of an optimal-control problem
on [0, T], with the nonlinear multigrid method MG/OPT (Nash 2000, "A multigrid approach to
discretized optimization problems", Optim. Methods Softw. 14) over a hierarchy of networks
with larger time steps. This module implements that method as an
:class:`~msnet.methods.base.UpdateRule`; the full text of the paper could not be consulted
here, so what follows is exactly what msnet does, with the places where it may deviate.

**Hierarchy.** Level l = 1..L (L finest = the network being trained) has N_l = N_L / 2^(L-l)
steps per stage over the same T, so h_l = 2^(L-l) h_L. The coarse networks are built once
(:func:`msnet.multigrid.transfer_depth`) and reused. Only the per-step tensors of the stages
(``block.step_parameters()``: stencils, biases, integrator-owned per-step parameters) live on
a time grid and are moved between levels; the opening layer, the connectives and the classifier
are the same variables on every level (identity restriction and prolongation); each coarse
network holds its own copy, overwritten at every cycle.

**Transfer operators** (per stage, N_c coarse and N_f = 2 N_c fine steps; built once as
matrices by applying the registered operators of :mod:`msnet.multigrid.time` to the identity):

* variables, fine -> coarse: x_c = R x_f, ``trainer.restriction`` = ``injection`` (default) or
  ``average``;
* corrections, coarse -> fine: e_f = P (x_c - R x_f), ``trainer.prolongation`` = ``linear``
  (default) or ``constant``;
* gradients, fine -> coarse, ``trainer.gradient_restriction``: ``transpose`` (default) uses
  P^T. This is what makes the coarse correction a descent direction:
  <grad f_f, P e_c> = <P^T grad f_f, e_c>, and the coarse objective's gradient at R x_f is
  P^T grad f_f (below), so a coarse step that decreases the coarse objective to first order
  prolongs to one that decreases the fine objective. It also carries the right scale in h:
  the gradient of step j's parameters is O(h) (y_{j+1} = y_j + h F(y_j; theta_j)), and a
  row of P^T sums two fine slices (interior rows of ``linear``: 1/2, 1, 1/2), so
  P^T g_f ~ 2 h_f g(t) = h_c g(t), the size of the coarse network's own gradient. (At the two
  ends of the time grid ``linear`` sums 3/2 and 5/2 fine slices, because its hat functions are
  cut at t = 0 and held constant on (t_{N-1}, T]; there the correction term below is O(1)
  relative, not O(h); ``constant`` sums exactly two everywhere.)
  ``scaled`` uses (N_f / N_c) R = 2 R instead, the variable restriction rescaled to the
  gradient's h: first-order coherent as well, but the correction is a descent direction only
  where 2 R agrees with P^T.

**One cycle** (``step(xb, yb)``), on level l with objective psi_l (psi_L = f_L = batch
cross-entropy + the configured regulariser) and weights x_l:

1. l coarsest: ``coarse_steps`` steps of level l's smoother on psi_l; stop.
2. ``nu1`` pre-smoothing steps of level l's smoother on psi_l.
3. Coarse correction: g_l = grad psi_l(x_l); x_{l-1} <- R x_l (shared variables copied);
   v = grad f_{l-1}(R x_l) - R_g g_l with R_g the gradient restriction; the coarse objective
   is psi_{l-1}(x) = f_{l-1}(x) - <v, x> (first-order coherence:
   grad psi_{l-1}(R x_l) = R_g g_l, tested to float64 round-off). Then ``gamma`` cycles on
   level l-1 (``cycle=V``: 1, ``W``: 2; with two levels W is a V-cycle with 2 ``coarse_steps``
   runs), the correction e_l = P (x_{l-1} - R x_l) (shared variables: x_{l-1} - x_l) and
   x_l <- x_l + alpha e_l with alpha from ``line_search``:

   * ``none`` (default): alpha = 1, the plain additive correction;
   * ``armijo``: Nash's safeguard, backtracking on psi_l from alpha = 1:
     psi_l(x + alpha e) <= psi_l(x) + c1 alpha min(<g_l, e>, 0), alpha halved at most
     ``max_backtracks`` times, else alpha = 0 (the correction is dropped). The directional
     derivative uses g_l, which step 3 computed anyway, so each trial costs one forward pass.

4. ``nu2`` post-smoothing steps on psi_l.

**Mini-batches.** The whole cycle uses the one mini-batch ``(xb, yb)`` it is handed: the
coherence term v is computed on that batch, and psi_{l-1} is a first-order model of f_l only for
the batch v was computed on. Smoothing steps therefore revisit the same batch too (one batch per
cycle is also what fits the trainer's one-batch-per-step loop); an epoch is one cycle per batch. With stochastic depth each forward pass draws its own
gates, so coherence holds only in expectation (exactly with ``p_last = 1``).

**Smoothers.** Level l's smoother is the optimiser ``optimizer.name`` of the registry
(:func:`~msnet.methods.first_order.build_optimizer`) over level l's parameters, learning rate
``optimizer.lr`` on the finest level and ``coarse_lr_factor`` times it on the coarse levels, with
the same per-epoch schedule; weight decay and momentum act inside the smoother and are not part
of psi_l. Each smoother is created once and keeps its state across cycles. For Adam this means
a coarse level's moment estimates average the gradients of successive coarse objectives
psi_{l-1}, which change from cycle to cycle (new batch, new x, new v), as the fine Adam's moments
average gradients of successive mini-batches; since grad psi_{l-1} = R_g g_l at the start of each
coarse solve, they track the restricted fine gradients. The coarse weights, unlike the moments,
are reset to R x_l at every cycle.

**Work** is counted in fine-gradient equivalents (FGE): one gradient (forward + backward) on
level l costs N_l / N_L FGE (opening layer and classifier are neglected: the stages dominate
for deep networks); a forward-only evaluation (line-search trials) costs 1/3 of a gradient at
its level (backward ~ 2 forwards). The per-cycle ``loss_after`` diagnostic
(``trainer.cycle_loss``) costs a fine forward pass and is not counted as work. With two levels,
one V-cycle costs nu1 + nu2 + 1 fine gradients plus (1 + coarse_steps) / 2 FGE on the coarse
level; plain training costs 1 FGE per batch.

**Where this may deviate from the paper** (not checkable here): the smoothing steps' use of the
cycle's batch (a variant would draw nu1 + nu2 + 1 batches per cycle and keep only the coarse
correction on one), Adam rather than plain SGD as the default smoother, the transfer operators'
end-of-interval treatment, and the FGE cost model. What msnet measures with it
(``scripts/bench/bench_mgopt.py``, ``scripts/reproduce/gaedke2020.sh``) is in docs/results.md ("MG/OPT: does it pay?").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from msnet.errors import MsnetError
from msnet.config import Cycle, MGOptConfig, settings_from
from msnet.core import INTEGRATORS, ODEResNet
from msnet.multigrid.time import TIME_PROLONGATIONS, TIME_RESTRICTIONS
from msnet.methods.hierarchy import HierarchyLevel, build_transfers, check_saved_depths, coarse_depths, couple_coarse, hierarchy_parts, move, nested_settings
from msnet.methods.first_order import build_optimizer, build_scheduler, check_optimizer
from msnet.methods.base import UPDATE_RULES, Penalty, StepOutput, UpdateRule
FORWARD_COST = 1.0 / 3.0
"""Cost of a forward-only evaluation in gradients of the same level (backward ~ 2 forwards)."""


def mgopt_settings(trainer_cfg: Any) -> MGOptConfig:
    """The ``trainer`` config as an :class:`~msnet.config.MGOptConfig`, range-checked (the schema has checked
    the types and closed choices); a bad value is one :class:`MsnetError` line naming the fix."""
    s = settings_from(MGOptConfig, trainer_cfg)
    TIME_RESTRICTIONS.get(s.restriction)
    TIME_PROLONGATIONS.get(s.prolongation)
    if s.levels < 2:
        raise MsnetError(f"trainer.levels must be at least 2 for trainer=mgopt, got {s.levels}; "
                         "use trainer=single for one level")
    for key in ("nu1", "nu2", "coarse_steps", "max_backtracks"):
        if getattr(s, key) < 0:
            raise MsnetError(f"trainer.{key} must be >= 0, got {getattr(s, key)}")
    if not s.coarse_lr_factor > 0:
        raise MsnetError(f"trainer.coarse_lr_factor must be positive, got {s.coarse_lr_factor}")
    if not 0 < s.armijo_c1 < 1:
        raise MsnetError(f"trainer.armijo_c1 must be in (0, 1), got {s.armijo_c1}")
    return s


@dataclass
class MGLevel(HierarchyLevel):
    """One level of the MG/OPT hierarchy (:class:`~msnet.methods.hierarchy.HierarchyLevel`) with its smoother:
    ``optimizer`` over ``params`` and its per-epoch ``scheduler``."""

    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Optional[Any] = None

    def smooth(self, xb: torch.Tensor, yb: torch.Tensor, grad_clip: Optional[float]
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One smoother step on psi (on the finest level exactly :class:`~msnet.methods.first_order.FirstOrder`'s
        step); returns the data loss and logits before it."""
        psi, loss, logits = self.objective(xb, yb)
        self.optimizer.zero_grad(set_to_none=True)
        psi.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(self.net.parameters(), grad_clip)
        self.optimizer.step()
        self.grad_evals += 1
        return loss.detach(), logits.detach()


@dataclass
class _CycleLog:
    """The finest level's coarse correction in one cycle: psi before it, slope <g, e>, alpha, psi after."""

    psi_before: Optional[float] = None
    slope: Optional[float] = None
    alpha: Optional[float] = None
    psi_corrected: Optional[float] = None


@UPDATE_RULES.register("mgopt")
class MGOpt(UpdateRule):
    """MG/OPT cycles over a hierarchy of coarser-in-time copies of ``model`` (see the module docstring).

    ``levels[-1]`` is ``model`` itself (its smoother is the run's optimiser, whose state is the
    checkpoint's ``optimizer``); ``levels[0]`` the coarsest network. Selected by ``trainer=mgopt``;
    one process only, no GPU speed options.
    """

    selected_by = "trainer"
    data_parallel = False
    speed_options = False

    @classmethod
    def check(cls, cfg: Any) -> None:
        """The trainer keys MG/OPT reads are in range, its smoother is a ``torch.optim`` optimiser, and the
        integrator has per-step parameters to move in time."""
        mgopt_settings(cfg.trainer)
        if cfg.optimizer.name in UPDATE_RULES:
            raise MsnetError(f"trainer=mgopt smooths with a torch.optim optimiser, not optimizer={cfg.optimizer.name}; "
                             "use optimizer=adam, adamw or sgd")
        check_optimizer(cfg.optimizer)
        if not INTEGRATORS.get(cfg.model.integrator).per_step_params:
            raise MsnetError(f"trainer=mgopt moves per-step parameters in time, and integrator "
                             f"{cfg.model.integrator!r} has none; use an integrator with per-step parameters")

    @classmethod
    def from_config(cls, model: nn.Module, cfg: Any, opt_cfg: Any, epochs: int,
                    penalty: Optional[Penalty]) -> "MGOpt":
        """The rule for ``trainer=mgopt``; config problems are one :class:`MsnetError` line."""
        settings = nested_settings(mgopt_settings(cfg.trainer), model, int(cfg.model.layers))
        return cls(model, settings, opt_cfg, cfg.regularizer, epochs, penalty, cfg.trainer.get("grad_clip"))

    def __init__(self, model: ODEResNet, settings: MGOptConfig, opt_cfg: Any, reg_cfg: Any, epochs: int,
                 penalty: Optional[Penalty], grad_clip: Optional[float] = None):
        self.model, self.s, self.grad_clip = model, settings, grad_clip
        self.gamma = Cycle(settings.cycle).gamma
        depths = coarse_depths(model.depth(), settings.levels)
        parts = hierarchy_parts(model, depths, settings.prolongation, settings.restriction, reg_cfg, penalty)
        self.levels: List[MGLevel] = []
        for i, part in enumerate(parts):
            finest = i == len(parts) - 1
            lr_i = float(opt_cfg.lr) * (1.0 if finest else settings.coarse_lr_factor)
            cfg_i = opt_cfg if finest else OmegaConf.merge(opt_cfg, {"lr": lr_i})
            optimizer = build_optimizer(part["params"], cfg_i)
            self.levels.append(MGLevel(**part, optimizer=optimizer,
                                       scheduler=build_scheduler(optimizer, cfg_i, max(1, epochs))))
        self.transfers = build_transfers(depths, settings.restriction, settings.prolongation,
                                         settings.gradient_restriction, next(model.parameters()))
        self.cycles = 0
        self.work_fge = 0.0
        self._epoch = {"cycles": 0, "accepted": 0, "alpha_sum": 0.0}

    def prepare_coarse(self, i: int, xb: torch.Tensor, yb: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """Set up level i-1 from level i's current weights: x_{i-1} <- R x_i and its coherence term v.

        Returns ``(psi_i, loss, logits, grad psi_i)`` at x_i (one gradient on each of the two levels).
        Afterwards the gradient of ``levels[i-1].objective`` at the restricted point is R_g grad psi_i(x_i).
        """
        psi, loss, logits, g = self.levels[i].gradient(xb, yb)
        couple_coarse(self.levels[i], self.levels[i - 1], self.transfers[i], g, xb, yb)
        return psi, loss, logits, g

    # --- the cycle ---------------------------------------------------------------------------
    def _cycle(self, i: int, xb: torch.Tensor, yb: torch.Tensor, log: _CycleLog, first: List[Any]) -> None:
        lv = self.levels[i]
        if i == 0:
            for _ in range(self.s.coarse_steps):
                lv.smooth(xb, yb, self.grad_clip)
            return
        for _ in range(self.s.nu1):
            out = lv.smooth(xb, yb, self.grad_clip)
            if not first:
                first.append(out)
        self._coarse_correction(i, xb, yb, log, first)
        for _ in range(self.s.nu2):
            lv.smooth(xb, yb, self.grad_clip)

    def _coarse_correction(self, i: int, xb: torch.Tensor, yb: torch.Tensor, log: _CycleLog, first: List[Any]) -> None:
        fine, coarse, tr = self.levels[i], self.levels[i - 1], self.transfers[i]
        psi0, loss, logits, g = self.prepare_coarse(i, xb, yb)
        if not first:  # nu1 = 0: this forward pass is the cycle's first evaluation
            first.append((loss, logits))
        with torch.no_grad():
            xc0 = [p.detach().clone() for p in coarse.params]
        for _ in range(self.gamma):
            self._cycle(i - 1, xb, yb, log, first)
        with torch.no_grad():
            e = [move(tr.P, st, pc - c0) for pc, c0, st in zip(coarse.params, xc0, fine.stage)]
            slope = float(sum((gk * ek).sum() for gk, ek in zip(g, e)))
            zero = all(not bool(ek.any()) for ek in e)
            alpha, corrected = 0.0, None
            if zero:  # no coarse iteration moved the coarse weights: nothing to add, nothing to search
                pass
            elif self.s.line_search == "none":
                alpha = 1.0
                for p, ek in zip(fine.params, e):
                    p.add_(ek)
            else:
                alpha, corrected = self._armijo(fine, e, float(psi0), slope, xb, yb)
        if i == len(self.levels) - 1:  # diagnostics of the finest level's correction
            log.psi_before, log.slope, log.alpha, log.psi_corrected = float(psi0), slope, alpha, corrected
            self._epoch["accepted"] += 1 if alpha > 0 else 0
            self._epoch["alpha_sum"] += alpha

    def _armijo(self, lv: MGLevel, e: List[torch.Tensor], psi0: float, slope: float, xb: torch.Tensor,
                yb: torch.Tensor) -> Tuple[float, Optional[float]]:
        """Backtracking on psi along e from alpha = 1 (see the module docstring).

        Leaves x = x0 + alpha e and returns ``(alpha, psi there)``; ``(0, None)`` and x = x0 when every
        trial fails.
        """
        x0 = [p.detach().clone() for p in lv.params]
        alpha = 1.0
        for _ in range(self.s.max_backtracks + 1):
            for p, a, ek in zip(lv.params, x0, e):
                p.copy_(a + alpha * ek)
            value = float(lv.value(xb, yb))
            if value <= psi0 + self.s.armijo_c1 * alpha * min(slope, 0.0):
                return alpha, value
            alpha *= 0.5
        for p, a in zip(lv.params, x0):
            p.copy_(a)
        return 0.0, None

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> StepOutput:
        """One MG/OPT cycle on this mini-batch; the loss and logits are those before the cycle."""
        for lv in self.levels[:-1]:
            lv.net.train(self.model.training)
        before = [(lv.grad_evals, lv.forward_evals) for lv in self.levels]
        if not self._epoch["cycles"]:  # the smoothers' learning rates this epoch (schedulers step at its end)
            self._epoch["lr"] = [lv.optimizer.param_groups[0]["lr"] for lv in self.levels]
        log, first = _CycleLog(), []
        self._cycle(len(self.levels) - 1, xb, yb, log, first)
        loss, logits = first[0]
        grads = [lv.grad_evals - b[0] for lv, b in zip(self.levels, before)]
        forwards = [lv.forward_evals - b[1] for lv, b in zip(self.levels, before)]
        work = sum((gk + FORWARD_COST * fk) * lv.cost for gk, fk, lv in zip(grads, forwards, self.levels))
        self.work_fge += work
        self.cycles += 1
        self._epoch["cycles"] += 1
        info: Dict[str, Any] = {
            "cycle": self.cycles, "loss_before": float(loss), "psi_pre": log.psi_before,
            "alpha": log.alpha, "slope": log.slope,
            "psi_corrected": log.psi_corrected, "grad_evals": grads, "forward_evals": forwards,
            "work_fge": work, "work_fge_total": self.work_fge,
        }
        if self.s.cycle_loss:
            with torch.no_grad():
                info["loss_after"] = float(F.cross_entropy(self.model(xb), yb))
        return StepOutput(loss, logits, info)

    def end_epoch(self) -> None:
        for lv in self.levels:
            if lv.scheduler is not None:
                lv.scheduler.step()

    @property
    def lr(self) -> float:
        return self.levels[-1].optimizer.param_groups[0]["lr"]

    def epoch_stats(self) -> Dict[str, Any]:
        """Cumulative work and evaluations per level (coarsest first); this epoch's share of accepted
        finest-level corrections and their mean alpha (those two counters restart after each call); ``mg_lr``:
        the learning rate each level's smoother stepped with in this epoch (coarsest first)."""
        ep = self._epoch
        stats = {
            "work_fge": self.work_fge,
            "cycles": self.cycles,
            "grad_evals": [lv.grad_evals for lv in self.levels],
            "forward_evals": [lv.forward_evals for lv in self.levels],
            "mg_accepted": ep["accepted"] / max(1, ep["cycles"]),
            "mg_alpha": ep["alpha_sum"] / max(1, ep["cycles"]),
            "mg_lr": ep.get("lr"),
        }
        self._epoch = {"cycles": 0, "accepted": 0, "alpha_sum": 0.0}
        return stats

    def state_dict(self) -> Dict[str, Any]:
        fine = self.levels[-1]
        return {
            "optimizer": fine.optimizer.state_dict(),
            "scheduler": fine.scheduler.state_dict() if fine.scheduler is not None else None,
            "mgopt": {
                "levels": [{"optimizer": lv.optimizer.state_dict(),
                            "scheduler": lv.scheduler.state_dict() if lv.scheduler is not None else None}
                           for lv in self.levels[:-1]],
                "depths": [lv.net.depth() for lv in self.levels],
                "cycles": self.cycles, "work_fge": self.work_fge,
                "grad_evals": [lv.grad_evals for lv in self.levels],
                "forward_evals": [lv.forward_evals for lv in self.levels],
            },
        }

    def load_state_dict(self, ckpt: Dict[str, Any]) -> None:
        fine = self.levels[-1]
        if ckpt.get("optimizer") is not None:
            fine.optimizer.load_state_dict(ckpt["optimizer"])
        if fine.scheduler is not None and ckpt.get("scheduler") is not None:
            fine.scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt.get("mgopt")
        if not state:
            return
        check_saved_depths(self.levels, state["depths"], "MG/OPT", ckpt.get("path"))
        for lv, saved in zip(self.levels[:-1], state["levels"]):
            lv.optimizer.load_state_dict(saved["optimizer"])
            if lv.scheduler is not None and saved["scheduler"] is not None:
                lv.scheduler.load_state_dict(saved["scheduler"])
        self.cycles, self.work_fge = int(state["cycles"]), float(state["work_fge"])
        for lv, g, f in zip(self.levels, state["grad_evals"], state["forward_evals"]):
            lv.grad_evals, lv.forward_evals = int(g), int(f)

"""``trainer=rmtr``: the recursive multilevel trust-region method (RMTR) through coarser-in-time networks.

Gratton, Sartenaer, Toint, "Recursive trust-region methods for multiscale nonlinear optimization",
SIAM J. Optim. 19 (2008), define RMTR; Kopaničáková & Krause, "Globally convergent multilevel
training of deep residual networks", SIAM J. Sci. Comput. (2023, arXiv 2107.07572), apply it to
ResNets read as discretised ODEs, with L-SR1 models on every level and a dynamic sample size.
Neither text could be consulted here, so what follows is exactly what msnet does, from what is
known of the method, with the places where it may deviate.

**Hierarchy** (shared with ``trainer=mgopt``, :mod:`msnet.methods.hierarchy`): level l = 1..L (L
finest = the network trained) has N_l = N_L / 2^(L-l) steps per stage over the same T; per stage
R (``restriction``) moves variables fine -> coarse, P (``prolongation``) corrections coarse -> fine,
and gradients go fine -> coarse by P^T (Galerkin; the only choice here, since the coarse model's
first-order prediction <P^T g, s_c> must equal the fine one's <g, P s_c>). Shared variables
(opening layer, connectives, classifier) move by the identity. All vectors below are the level's
parameters flattened into one vector; ||.|| is the Euclidean norm of that vector.

**Objectives.** The finest objective is psi_L(x) = CE(x; W) + penalty(x) on the cycle's sample W
(below). The coarse objective built at a fine iterate x_l with gradient g_l is the first-order
coherent model

    psi_{l-1}(x) = f_{l-1}(x) - <v, x>,   v = grad f_{l-1}(R x_l) - P^T g_l,

so grad psi_{l-1}(R x_l) = P^T g_l (tested to float64 round-off); f_{l-1} is the coarse network's
CE + its own penalty on the same sample. (The paper's h_{l-1}(x) = f_{l-1}(x) + <P^T g_l - grad
f_{l-1}(R x_l), x - R x_l> differs from psi_{l-1} by a constant, which no ratio sees.)

**One trust-region step** on level l at x with value psi, gradient g and radius D (the step's
radius, below): s minimises the L-SR1 model m(s) = <g, s> + 1/2 s^T B s subject to ||s|| <= D
(Steihaug-Toint truncated CG, :func:`steihaug`: its first iterate is the Cauchy point, so
m(s) <= -1/2 ||g|| min(D, ||g|| / ||B||)); pred = -m(s) > 0. The trial x + s costs one gradient
(value and gradient in one pass); the pair (s, y = grad psi(x + s) - g) updates B whether or not
the step is accepted. rho = (psi(x) - psi(x + s)) / pred; the step is accepted iff rho >= eta1
(> 0, so an accepted step decreases psi_l). Radius rule (:func:`next_radius`), with D the step's
radius and Delta the level's:

    rho <  eta1:                                  Delta <- gamma1 D           (rejected)
    rho >  eta2 and ||s|| >= (1 - 1e-3) D:        Delta <- max(Delta, min(gamma2 D, radius_max))
    otherwise:                                    Delta unchanged.

**Coarse correction** (level l > 1, at x_l with g_l and step radius D): if
||P^T g_l|| < kappa_g ||g_l|| the coarse level is skipped (Gratton et al.'s test). Otherwise
x_{l-1,0} = R x_l, psi_{l-1} as above (one coarse gradient), and level l-1 is solved recursively
inside the room D, measured in level l's norm (the coarse norm ||d||_{l-1} = ||P d||_l that P induces): with
d = x_{l-1} - x_{l-1,0} and ||P||_2 the largest singular value over the stages' P (1 for the
shared variables), every coarse step's radius is min(Delta_{l-1}, (D - ||P d||) / ||P||_2), so
||P (d + s_c)|| <= ||P d|| + ||P||_2 ||s_c|| <= D, and the level stops once ||P d|| >= (1 - 1e-3) D.
The prolonged step s = P d therefore has ||s|| <= D: it respects the fine radius (tested).
Delta_{l-1} starts at D / ||P||_2 on every entry. The fine trial at x_l + s is judged as a
trust-region step with pred = psi_{l-1}(x_{l-1,0}) - psi_{l-1}(x_{l-1}) (the coarse objective's
actual decrease); "at the boundary" means ||s|| >= (1 - 1e-3) D, as for any step.

**The V-cycle** on level l (room D_room, infinite on the finest level): on the coarsest of several
levels, ``coarse_steps`` trust-region steps; on any other level ``nu1`` steps, the coarse correction
(l > 1), ``nu2`` steps; a level stops early when its room is used up. ``trainer.levels=1`` is the
single-level L-SR1 trust-region method: ``nu1 + nu2`` steps per mini-batch.

**L-SR1** (:class:`LSR1`): B = gamma I + sum_j c_j r_j r_j^T, built from the kept pairs oldest
first, r_j = y_j - B_j s_j, c_j = 1 / <r_j, s_j> (B_j: the matrix before pair j), so B s_j = y_j for
the newest pair (and for all pairs on a quadratic). A new pair is kept only if
|<s, y - B s>| >= ``sr1_skip`` ||s|| ||y - B s||; gamma = <y, y> / <s, y> of the newest pair with
<s, y> > 0 (``sr1_gamma0`` before), and B is rebuilt from its ``memory`` newest pairs at every new
pair (pairs that then fail the skip rule are dropped). Every level keeps its memory across cycles:
a coarse level's pairs stay valid for its next model, since v changes psi_{l-1} by a linear term
only, which leaves its Hessian alone; the finest level's pairs come from earlier samples.

**Samples and the adaptive batch.** Each cycle works on one fixed sample W: the union of the last
k mini-batches the epoch loop handed to :meth:`RMTR.step` in this epoch (the current one
included; the window is emptied at each epoch's end, so the first k - 1 cycles of an epoch use
fewer). k starts at 1 and doubles, up to ``window_max``, after a cycle where either
(a) the last w = ``grow_patience`` cycles all had every finest-level trial rejected, or (b) at least
2w cycles have passed since k last changed and the mean of psi_L at the start of the last w cycles
is no lower than that of the w cycles before; both counters restart after a change.
``steps.jsonl`` logs the batches in the cycle's sample (``window``; k itself is ``rmtr_window`` in the
epoch record), its size (``samples``) and ``grew``.

**Work** in fine-gradient equivalents (FGE), as for ``trainer=mgopt``: a gradient on level l costs
N_l / N_L FGE per mini-batch in the sample (a plain first-order step on one mini-batch costs 1).
Every trial is a gradient evaluation and is counted; RMTR makes no forward-only evaluations (they
would cost 1/3). A cycle with two levels costs (1 + nu1 + 1 + nu2) fine gradients (the first
gradient, the smoothing trials and the correction's trial) plus (1 + coarse_steps) / 2 FGE on the
coarse level, times k, when every step is tried.

**Where this may deviate from the papers** (not checkable here): Euclidean rather than
infinity-norm trust regions (Kopaničáková & Krause use the infinity norm and a box-constrained
subproblem, where ||P s_c||_inf <= ||s_c||_inf holds for interpolation); the truncated-CG
subproblem solver instead of an exact L-SR1 trust-region solve; the choice of gamma; the coarse
radius reset to its room at every entry; trial gradients counted whether or not they are accepted;
the adaptive sample rule above (a stall/ratio rule; no variance test, which needs per-sample
gradients); V-cycles only. Stochastic depth is refused, since the ratio test needs a deterministic
objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from msnet.errors import MsnetError
from msnet.config import RMTRConfig, settings_from, stochastic_depth_p_last
from msnet.core import INTEGRATORS, ODEResNet
from msnet.multigrid.time import TIME_PROLONGATIONS, TIME_RESTRICTIONS
from msnet.methods.hierarchy import HierarchyLevel, build_transfers, check_saved_depths, coarse_depths, couple_coarse, hierarchy_parts, move, nested_settings
from msnet.methods.base import UPDATE_RULES, Penalty, StepOutput, UpdateRule
from msnet.methods.trust_region import LSR1, flat, model_decrease, steihaug, unflat

BOUNDARY = 1e-3
"""A step is at the boundary when ||s|| >= (1 - BOUNDARY) times its radius; a level's room is used up likewise."""


def rmtr_settings(trainer_cfg: Any) -> RMTRConfig:
    """The ``trainer`` config as an :class:`~msnet.config.RMTRConfig`, range-checked; a bad value is one
    :class:`MsnetError` line naming the fix."""
    s = settings_from(RMTRConfig, trainer_cfg)
    TIME_RESTRICTIONS.get(s.restriction)
    TIME_PROLONGATIONS.get(s.prolongation)
    checks = [
        (s.levels >= 1, f"trainer.levels must be at least 1, got {s.levels}"),
        (min(s.nu1, s.nu2, s.coarse_steps) >= 0,
         f"trainer.nu1, nu2 and coarse_steps must be >= 0, got {s.nu1}, {s.nu2}, {s.coarse_steps}"),
        (s.levels > 1 or s.nu1 + s.nu2 >= 1,
         "trainer.levels=1 takes nu1 + nu2 trust-region steps per batch; set trainer.nu1 or trainer.nu2 >= 1"),
        (s.levels == 1 or s.coarse_steps >= 1,
         "trainer.coarse_steps must be >= 1 with trainer.levels >= 2 (use trainer.levels=1 for no coarse level)"),
        (0 < s.radius <= s.radius_max,
         f"trainer.radius must be in (0, radius_max={s.radius_max}], got {s.radius}"),
        (0 < s.eta1 <= s.eta2 < 1, f"need 0 < trainer.eta1 <= trainer.eta2 < 1, got {s.eta1}, {s.eta2}"),
        (0 < s.gamma1 < 1, f"trainer.gamma1 must be in (0, 1), got {s.gamma1}"),
        (s.gamma2 >= 1, f"trainer.gamma2 must be >= 1, got {s.gamma2}"),
        (s.memory >= 0, f"trainer.memory must be >= 0, got {s.memory}"),
        (0 <= s.sr1_skip < 1, f"trainer.sr1_skip must be in [0, 1), got {s.sr1_skip}"),
        (s.sr1_gamma0 > 0, f"trainer.sr1_gamma0 must be positive, got {s.sr1_gamma0}"),
        (s.kappa_g >= 0, f"trainer.kappa_g must be >= 0, got {s.kappa_g}"),
        (s.window_max >= 1, f"trainer.window_max must be at least 1, got {s.window_max}"),
        (s.grow_patience >= 1, f"trainer.grow_patience must be at least 1, got {s.grow_patience}"),
    ]
    for ok, message in checks:
        if not ok:
            raise MsnetError(message)
    return s


def next_radius(radius: float, step_radius: float, rho: float, at_boundary: bool, s: RMTRConfig) -> float:
    """The level's radius after a trial with ratio ``rho`` whose step had radius ``step_radius`` (module docstring)."""
    if rho < s.eta1:
        return s.gamma1 * step_radius
    if rho > s.eta2 and at_boundary:
        return max(radius, min(s.gamma2 * step_radius, s.radius_max))
    return radius


@dataclass
class TRLevel(HierarchyLevel):
    """One level of the RMTR hierarchy (:class:`~msnet.methods.hierarchy.HierarchyLevel`) with its trust-region
    ``radius`` Delta, its L-SR1 matrix ``B`` and its trial counters."""

    radius: float = 0.0
    B: Optional[LSR1] = None
    trials: int = 0
    accepted: int = 0

    def weights(self) -> torch.Tensor:
        return flat(self.params)

    @torch.no_grad()
    def set_weights(self, x: torch.Tensor) -> None:
        for p, c in zip(self.params, unflat(x, self.params)):
            p.copy_(c)


@dataclass
class _CycleLog:
    """What one cycle did on the finest level: its trials and what became of its coarse correction."""

    trials: List[Dict[str, Any]] = field(default_factory=list)
    coarse: Optional[str] = None


@UPDATE_RULES.register("rmtr")
class RMTR(UpdateRule):
    """RMTR V-cycles over a hierarchy of coarser-in-time copies of ``model`` (see the module docstring).

    ``levels[-1]`` is ``model`` itself, ``levels[0]`` the coarsest network. Selected by ``trainer=rmtr``;
    one process only, no GPU speed options. ``optimizer.*`` is not used (the radius bounds the steps).
    """

    selected_by = "trainer"
    data_parallel = False
    speed_options = False

    @classmethod
    def check(cls, cfg: Any) -> None:
        """The trainer keys RMTR reads are in range; nothing else in the config claims to shape its steps; the
        objective is deterministic; the integrator has per-step parameters to move in time (levels >= 2)."""
        s = rmtr_settings(cfg.trainer)
        opt = cfg.optimizer
        if opt.name in UPDATE_RULES:
            raise MsnetError(f"trainer=rmtr takes trust-region steps, not optimizer={opt.name}; "
                             "leave optimizer at its default (trainer=rmtr does not use it)")
        if opt.get("weight_decay", 0.0):
            raise MsnetError(f"trainer=rmtr does not use the optimizer's weight decay; set optimizer.weight_decay=0 "
                             f"(got {opt.weight_decay}) and regularise with regularizer.*")
        if cfg.trainer.get("grad_clip") is not None:
            raise MsnetError("trainer=rmtr bounds its steps by the trust region; drop trainer.grad_clip")
        p_last = stochastic_depth_p_last(cfg.model)
        if p_last != 1.0:
            raise MsnetError(f"trainer=rmtr's ratio test needs a deterministic objective; set "
                             f"model.stochastic_depth.p_last=1 (got {p_last})")
        if s.levels > 1 and not INTEGRATORS.get(cfg.model.integrator).per_step_params:
            raise MsnetError(f"trainer=rmtr moves per-step parameters in time, and integrator "
                             f"{cfg.model.integrator!r} has none; use trainer.levels=1 or an integrator with "
                             "per-step parameters")

    @classmethod
    def from_config(cls, model: nn.Module, cfg: Any, opt_cfg: Any, epochs: int,
                    penalty: Optional[Penalty]) -> "RMTR":
        """The rule for ``trainer=rmtr``; config problems are one :class:`MsnetError` line."""
        settings = nested_settings(rmtr_settings(cfg.trainer), model, int(cfg.model.layers))
        return cls(model, settings, cfg.regularizer, penalty)

    def __init__(self, model: ODEResNet, settings: RMTRConfig, reg_cfg: Any, penalty: Optional[Penalty]):
        self.model, self.s = model, settings
        depths = coarse_depths(model.depth(), settings.levels)
        parts = hierarchy_parts(model, depths, settings.prolongation, settings.restriction, reg_cfg, penalty)
        self.levels = [TRLevel(**part, radius=settings.radius,
                               B=LSR1(settings.memory, settings.sr1_skip, settings.sr1_gamma0)) for part in parts]
        self.transfers = build_transfers(depths, settings.restriction, settings.prolongation, "transpose",
                                         next(model.parameters()))
        # ||P||_2 between level i-1 and i: the largest singular value over the stages (1 for shared variables)
        self.p_norm: List[Optional[float]] = [None] + [
            max([1.0] + [float(torch.linalg.matrix_norm(P.double(), ord=2)) for P in tr.P]) for tr in self.transfers[1:]
        ]
        self.cg_iters = 2 * settings.memory + 2  # B = gamma I + rank <= memory: CG ends in memory + 1 steps
        self.window: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.k = 1
        self.fails = 0
        self.losses: List[float] = []
        self.cycles = 0
        self.work_fge = 0.0
        self._epoch = {"cycles": 0, "trials": 0, "accepted": 0, "coarse": 0}

    # --- one trust-region trial ----------------------------------------------------------------
    def _trial(self, i: int, s: torch.Tensor, psi: float, g: torch.Tensor, pred: float, step_radius: float,
               at_boundary: bool, batch: Tuple[torch.Tensor, torch.Tensor], kind: str,
               log: _CycleLog) -> Tuple[float, torch.Tensor]:
        """Try x + s on level i (one gradient), update B with the pair, accept iff rho >= eta1, update the
        radius; returns the level's value and gradient at the (new or old) iterate."""
        lv = self.levels[i]
        x = lv.weights()
        lv.set_weights(x + s)
        psi_t, _, _, g_t = lv.gradient(*batch)
        g_t, psi_t = flat(g_t), float(psi_t)
        if math.isfinite(psi_t) and bool(torch.isfinite(g_t).all()):
            lv.B.update(s, g_t - g)
        rho = (psi - psi_t) / pred
        accepted = rho >= self.s.eta1 and math.isfinite(psi_t)
        if not accepted:
            lv.set_weights(x)
            rho = rho if math.isfinite(rho) else -math.inf
        lv.radius = next_radius(lv.radius, step_radius, rho, at_boundary, self.s)
        lv.trials += 1
        lv.accepted += int(accepted)
        if i == len(self.levels) - 1:
            log.trials.append({"kind": kind, "rho": rho if math.isfinite(rho) else None, "accepted": accepted,
                               "step": float(s.norm()), "radius": step_radius, "pred": pred})
        return (psi_t, g_t) if accepted else (psi, g)

    def _smoothing_step(self, i: int, psi: float, g: torch.Tensor, step_radius: float,
                        batch: Tuple[torch.Tensor, torch.Tensor], log: _CycleLog) -> Tuple[float, torch.Tensor]:
        """One trust-region step on level i's own L-SR1 model."""
        B = self.levels[i].B
        s, boundary = steihaug(g, B.matvec, step_radius, self.cg_iters)
        pred = model_decrease(g, s, B.matvec)
        if not pred > 0.0:  # g = 0 (or round-off): no step to try
            return psi, g
        at_boundary = boundary or float(s.norm()) >= (1 - BOUNDARY) * step_radius
        return self._trial(i, s, psi, g, pred, step_radius, at_boundary, batch, "smooth", log)

    def _prolong(self, i: int, d: torch.Tensor) -> torch.Tensor:
        """A flat step of level i moved to level i+1: P per stage, shared variables as they are."""
        tr, coarse = self.transfers[i + 1], self.levels[i]
        return flat([move(tr.P, st, t) for t, st in zip(unflat(d, coarse.params), coarse.stage)])

    def _coarse_correction(self, i: int, psi: float, g: torch.Tensor, step_radius: float,
                           batch: Tuple[torch.Tensor, torch.Tensor], log: _CycleLog) -> Tuple[float, torch.Tensor]:
        """Solve level i-1 so that its prolonged step stays within ``step_radius``, then try that step on level i."""
        fine, coarse, tr = self.levels[i], self.levels[i - 1], self.transfers[i]
        finest = i == len(self.levels) - 1
        g_list = unflat(g, fine.params)
        g_c = flat([move(tr.G, st, gk) for gk, st in zip(g_list, fine.stage)])
        if not float(g_c.norm()) >= self.s.kappa_g * float(g.norm()) or float(g_c.norm()) == 0.0:
            log.coarse = "small_gradient" if finest else log.coarse
            return psi, g
        h0 = float(couple_coarse(fine, coarse, tr, g_list, *batch))
        coarse.radius = step_radius / self.p_norm[i]
        x_c0 = coarse.weights()
        h1, _ = self._solve(i - 1, h0, g_c, step_radius, batch, log)
        pred = h0 - h1
        if not pred > 0.0:
            log.coarse = "no_decrease" if finest else log.coarse
            return psi, g
        s = self._prolong(i - 1, coarse.weights() - x_c0)
        at_boundary = float(s.norm()) >= (1 - BOUNDARY) * step_radius
        out = self._trial(i, s, psi, g, pred, step_radius, at_boundary, batch, "coarse", log)
        if finest:
            log.coarse = "accepted" if log.trials[-1]["accepted"] else "rejected"
        return out

    def _solve(self, i: int, psi: float, g: torch.Tensor, room: float, batch: Tuple[torch.Tensor, torch.Tensor],
               log: _CycleLog) -> Tuple[float, torch.Tensor]:
        """Level i's part of the V-cycle from its current weights x_0 (value ``psi``, flat gradient ``g``); returns
        the final value and gradient. A coarse level keeps ||P (x - x_0)|| <= ``room``, measured on level i+1
        (``room`` is math.inf on the finest level)."""
        lv = self.levels[i]
        if i == 0 and len(self.levels) > 1:
            plan = ["smooth"] * self.s.coarse_steps
        else:
            plan = ["smooth"] * self.s.nu1 + (["coarse"] if i > 0 else []) + ["smooth"] * self.s.nu2
        x0 = lv.weights() if math.isfinite(room) else None
        for kind in plan:
            step_radius = lv.radius
            if x0 is not None:
                left = room - float(self._prolong(i, lv.weights() - x0).norm())
                if left <= BOUNDARY * room:
                    break
                step_radius = min(step_radius, left / self.p_norm[i + 1])
            take = self._smoothing_step if kind == "smooth" else self._coarse_correction
            psi, g = take(i, psi, g, step_radius, batch, log)
        return psi, g

    # --- the cycle -------------------------------------------------------------------------------
    def _sample(self, xb: torch.Tensor, yb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The cycle's sample: the last k mini-batches of this epoch, ``(xb, yb)`` last."""
        self.window = (self.window + [(xb, yb)])[-self.k:]
        if len(self.window) == 1:
            return xb, yb
        return torch.cat([w[0] for w in self.window]), torch.cat([w[1] for w in self.window])

    def _grow(self, psi0: float, any_accepted: bool) -> bool:
        """The adaptive-sample rule (module docstring); returns whether k doubled after this cycle."""
        self.fails = 0 if any_accepted else self.fails + 1
        w = self.s.grow_patience
        self.losses = (self.losses + [psi0])[-2 * w:]
        stalled = len(self.losses) == 2 * w and sum(self.losses[w:]) >= sum(self.losses[:w])
        if self.k >= self.s.window_max or not (self.fails >= w or stalled):
            return False
        self.k, self.fails, self.losses = min(2 * self.k, self.s.window_max), 0, []
        return True

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> StepOutput:
        """One RMTR V-cycle on the sample of the last k mini-batches; the loss and logits are this batch's, before
        the cycle."""
        for lv in self.levels[:-1]:
            lv.net.train(self.model.training)
        batch = self._sample(xb, yb)
        before = [(lv.grad_evals, lv.trials, lv.accepted) for lv in self.levels]
        fine = self.levels[-1]
        psi0, _, logits, g = fine.gradient(*batch)
        logits = logits[-yb.shape[0]:]
        log = _CycleLog()
        psi1, _ = self._solve(len(self.levels) - 1, float(psi0), flat(g), math.inf, batch, log)
        grads = [lv.grad_evals - b[0] for lv, b in zip(self.levels, before)]
        work = len(self.window) * sum(gk * lv.cost for gk, lv in zip(grads, self.levels))
        self.work_fge += work
        self.cycles += 1
        any_accepted = any(t["accepted"] for t in log.trials)
        ep = self._epoch
        ep["cycles"] += 1
        ep["trials"] += len(log.trials)
        ep["accepted"] += sum(t["accepted"] for t in log.trials)
        ep["coarse"] += log.coarse == "accepted"
        samples = int(batch[1].shape[0])
        grew = self._grow(float(psi0), any_accepted)
        info: Dict[str, Any] = {
            "cycle": self.cycles, "loss_before": float(F.cross_entropy(logits, yb)), "psi_before": float(psi0),
            "psi_after": psi1, "radius": [lv.radius for lv in self.levels], "trials": log.trials,
            "coarse": log.coarse, "tr_trials": [lv.trials - b[1] for lv, b in zip(self.levels, before)],
            "tr_accepted": [lv.accepted - b[2] for lv, b in zip(self.levels, before)],
            "lsr1_pairs": [len(lv.B.S) for lv in self.levels], "window": len(self.window), "samples": samples,
            "grew": grew, "grad_evals": grads, "work_fge": work, "work_fge_total": self.work_fge,
        }
        return StepOutput(F.cross_entropy(logits, yb).detach(), logits, info)

    def end_epoch(self) -> None:
        """The sample window does not reach across epochs (so a checkpoint holds no images)."""
        self.window = []

    def epoch_stats(self) -> Dict[str, Any]:
        """Cumulative work and gradients per level (coarsest first); the finest radius and window now; this epoch's
        share of accepted finest-level trials and of cycles whose coarse correction was accepted."""
        ep = self._epoch
        stats = {
            "work_fge": self.work_fge, "cycles": self.cycles, "grad_evals": [lv.grad_evals for lv in self.levels],
            "rmtr_radius": self.levels[-1].radius, "rmtr_window": self.k,
            "rmtr_accepted": ep["accepted"] / max(1, ep["trials"]),
            "rmtr_coarse_accepted": ep["coarse"] / max(1, ep["cycles"]),
        }
        self._epoch = {"cycles": 0, "trials": 0, "accepted": 0, "coarse": 0}
        return stats

    def state_dict(self) -> Dict[str, Any]:
        # "optimizer"/"scheduler" stay None so that a first-order rule resuming this checkpoint starts fresh.
        return {"optimizer": None, "scheduler": None, "rmtr": {
            "depths": [lv.net.depth() for lv in self.levels],
            "radius": [lv.radius for lv in self.levels], "lsr1": [lv.B.state_dict() for lv in self.levels],
            "trials": [lv.trials for lv in self.levels], "accepted": [lv.accepted for lv in self.levels],
            "grad_evals": [lv.grad_evals for lv in self.levels],
            "window": self.k, "fails": self.fails, "losses": list(self.losses),
            "cycles": self.cycles, "work_fge": self.work_fge,
        }}

    def load_state_dict(self, ckpt: Dict[str, Any]) -> None:
        state = ckpt.get("rmtr")
        if not state:
            return
        check_saved_depths(self.levels, state["depths"], "RMTR", ckpt.get("path"))
        like = next(self.model.parameters())
        for lv, radius, lsr1, trials, accepted, grads in zip(self.levels, state["radius"], state["lsr1"],
                                                              state["trials"], state["accepted"], state["grad_evals"]):
            lv.radius, lv.trials, lv.accepted, lv.grad_evals = float(radius), int(trials), int(accepted), int(grads)
            lv.B.load_state_dict(lsr1, like)
        self.k, self.fails, self.losses = int(state["window"]), int(state["fails"]), [float(x) for x in state["losses"]]
        self.cycles, self.work_fge = int(state["cycles"]), float(state["work_fge"])

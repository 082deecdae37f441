"""``optimizer=bcd``: block-coordinate descent with Gauss–Newton and Newton steps (Haber et al. 2018, Sec. 4).

The paper trains its ODE-ResNets with "the following Block-Coordinate-Descent (BCD) method:
each iteration consists of one Gauss–Newton step with subsampled Hessian to update the
forward propagation parameters and five inexact Newton steps to update the weights and
biases of the classifier", with derivative-based smoothness regularisation of the classifier
weights and across layers. msnet's iteration, on a mini-batch (x, y) of B images:

1. **Propagation block** theta_p (opening layer, every stage's per-step stencils, biases and
   integrator-owned per-step parameters, connectives; everything but the classifier), with
   the classifier fixed. One forward/backward pass on the whole batch gives the objective
   J and its gradient g. The Gauss–Newton matrix G = J_f^T H_CE J_f (+ the Hessian of the
   time-smoothness penalty, + weight decay) is applied matrix-free on the first
   ``hessian_subsample`` of the (already shuffled) batch (:class:`msnet.methods.newton.GaussNewton`:
   one ``jvp`` and one ``vjp`` per product). ``cg_iters`` CG iterations on
   (G + damping I) d = -g, then an Armijo backtracking line search on the whole batch from
   a = ``lr``: J(theta + a d) <= J(theta) + c1 a g^T d, a <- a * ``backtrack``, at most
   ``max_backtracks`` times (if all fail the step is not taken).
2. **Classifier block** theta_c (the full-field classifier's V and mu, or the GAP classifier's
   linear layer) on the features of the accepted network, computed once under no_grad:
   ``classifier_steps`` inexact Newton–CG steps (:func:`msnet.methods.newton.newton_cg`) on the
   convex J(theta_c), including the classifier-smoothness penalty ||grad W||^2, each with at
   most ``classifier_cg_iters`` CG iterations and an Armijo line search from a = 1.

J is the batch-mean cross-entropy + the configured regulariser (``regularizer.*``, both
terms; each block's gradient and Hessian see only its own term, the other is a constant)
+ ``optimizer.weight_decay`` / 2 ||theta||^2. Both blocks are monotone: each accepted step
lowers J on the batch.

**Damping (Levenberg–Marquardt).** G is only positive semi-definite and, estimated on a
subsample, can be far too optimistic; ``damping`` lambda is added to its diagonal. With
``damping_adapt`` lambda follows the ratio rho = actual / predicted decrease of J (the
prediction is the Gauss–Newton model without the damping term, m(a d) = a g^T d +
a^2/2 d^T G d): lambda *= 2/3 when rho > 3/4, lambda *= 3/2 when rho < 1/4 or the line search
failed (Martens 2010, "Deep learning via Hessian-free optimization", Sec. 4.1), kept in
[1e-8, 1e8]. lambda is the rule's state (checkpointed).

**Mini-batching.** The paper's shallow-to-deep experiment runs "20 iterations of the BCD" per
depth on 50,000 MNIST images, which reads as a (near) full-batch method whose objective and
gradient use the training set and whose Hessian is subsampled. Here one ``step(xb, yb)`` is
one BCD iteration on that mini-batch (objective and gradient on the batch, Hessian on its
subsample): ``trainer.batch_size`` = the training-set size gives the paper's full-batch
iteration, smaller batches a stochastic variant with many more iterations per epoch. A
second-order step needs a batch that represents the data: batch 1024 is a good start
(``conf/experiment/bcd_fashion.yaml``).

**Works with** every integrator (per-step tensors of any name are in the propagation block),
CPU and CUDA, float32 and float64. ``model.backprop=reversible``: the gradient on the whole
batch uses reversible backprop as configured; the Gauss–Newton products (forward-mode AD,
which the reversible autograd Function does not implement) store the subsample's states.
Stochastic depth: the gates are drawn once per iteration and held for all of its passes,
so each iteration minimises one (random) network.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, ContextManager, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from msnet.errors import MsnetError
from msnet.config import BCDConfig, settings_from
from msnet.core import ODEResNet
from msnet.methods.newton import GaussNewton, QuadraticHessian, armijo, axpy, conjugate_gradient, cross_entropy_objective, dot, newton_cg
from msnet.methods.base import UPDATE_RULES, Penalty, StepOutput, UpdateRule


DAMPING_RANGE = (1e-8, 1e8)
DAMPING_DROP, DAMPING_BOOST = 2.0 / 3.0, 1.5  # Martens 2010, Sec. 4.1
RHO_GOOD, RHO_BAD = 0.75, 0.25


def bcd_settings(opt_cfg: Any) -> BCDConfig:
    """The ``optimizer`` config as a :class:`~msnet.config.BCDConfig`, range-checked; a bad value is one
    :class:`MsnetError` line."""
    s = settings_from(BCDConfig, opt_cfg)
    checks = [
        (s.lr > 0, f"optimizer.lr (bcd's first trial step) must be positive, got {s.lr}"),
        (s.classifier_steps >= 0, f"optimizer.classifier_steps must be >= 0, got {s.classifier_steps}"),
        (s.classifier_cg_iters >= 1, f"optimizer.classifier_cg_iters must be >= 1, got {s.classifier_cg_iters}"),
        (s.cg_iters >= 1, f"optimizer.cg_iters must be >= 1, got {s.cg_iters}"),
        (s.hessian_subsample > 0, f"optimizer.hessian_subsample must be a fraction in (0, 1] or a count > 1, "
                                  f"got {s.hessian_subsample}"),
        (0 < s.armijo_c1 < 1, f"optimizer.armijo_c1 must be in (0, 1), got {s.armijo_c1}"),
        (0 < s.backtrack < 1, f"optimizer.backtrack must be in (0, 1), got {s.backtrack}"),
        (s.max_backtracks >= 0, f"optimizer.max_backtracks must be >= 0, got {s.max_backtracks}"),
        (s.damping >= 0, f"optimizer.damping must be >= 0, got {s.damping}"),
        (s.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {s.weight_decay}"),
    ]
    for ok, message in checks:
        if not ok:
            raise MsnetError(message)
    return s


def gn_subsample(settings: BCDConfig, batch: int) -> int:
    """Images of a batch of ``batch`` used for the Gauss–Newton matrix (at least 1)."""
    n = settings.hessian_subsample * batch if settings.hessian_subsample <= 1 else settings.hessian_subsample
    return max(1, min(batch, int(round(n))))


def stored_states(model: nn.Module) -> ContextManager[None]:
    """Run the stages with ``backprop=store`` inside (:meth:`ODEResNet.storing_states`): forward-mode AD (jvp)
    cannot pass the reversible autograd Function, and the subsample's states are small."""
    return model.storing_states() if isinstance(model, ODEResNet) else contextlib.nullcontext()


@UPDATE_RULES.register("bcd")
class BCD(UpdateRule):
    """One BCD iteration per mini-batch (module docstring); ``info`` goes to ``steps.jsonl``.

    Selected by ``optimizer=bcd``; one process only, no GPU speed options (its line searches and
    Gauss–Newton products need the whole objective in float32/64 on one device).
    """

    selected_by = "optimizer"
    data_parallel = False
    speed_options = False

    @classmethod
    def check(cls, cfg: Any) -> None:
        cls.settings_for(cfg.optimizer, cfg.trainer)

    @staticmethod
    def settings_for(opt_cfg: Any, trainer_cfg: Any) -> BCDConfig:
        """The optimizer keys BCD reads, in range; and the run asks nothing that BCD decides itself."""
        if opt_cfg.get("scheduler", "constant") != "constant":
            raise MsnetError(
                f"optimizer=bcd chooses its step length by line search; set optimizer.scheduler=constant "
                f"(got {opt_cfg.scheduler})"
            )
        if trainer_cfg.get("grad_clip") is not None:
            raise MsnetError("optimizer=bcd bounds its steps by line search; drop trainer.grad_clip")
        return bcd_settings(opt_cfg)

    @classmethod
    def from_config(cls, model: nn.Module, cfg: Any, opt_cfg: Any, epochs: int, penalty: Optional[Penalty]) -> "BCD":
        """The rule for ``optimizer=bcd``; config problems are one :class:`MsnetError` line."""
        return cls(model, cls.settings_for(opt_cfg, cfg.trainer), penalty)

    def __init__(self, model: nn.Module, settings: BCDConfig, penalty: Optional[Penalty] = None):
        self.model, self.settings, self.penalty = model, settings, penalty
        self.damping = settings.damping
        self.iterations = 0
        self._epoch: Dict[str, float] = {}
        self._last_epoch: Dict[str, Any] = {}
        self._reset_epoch()

    # --- the two blocks -------------------------------------------------------------------
    def blocks(self) -> Tuple[List[Tuple[str, nn.Parameter]], List[nn.Parameter]]:
        """``(propagation, classifier)``: named propagation parameters and the classifier's.

        Looked up at every step: depth and resolution schedules replace parameters.
        """
        classifier = list(self.model.classifier.parameters())
        ids = {id(p) for p in classifier}
        prop = [(n, p) for n, p in self.model.named_parameters() if id(p) not in ids]
        return prop, classifier

    @contextlib.contextmanager
    def _noise(self, seed: Optional[int]) -> Iterator[None]:
        """Hold stochastic depth's gates fixed for every pass of one iteration (CPU RNG, seeded)."""
        if seed is None:
            yield
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield

    # --- one iteration --------------------------------------------------------------------
    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> StepOutput:
        s, model = self.settings, self.model
        prop, classifier = self.blocks()
        theta = [p for _, p in prop]
        every = theta + classifier
        wd = s.weight_decay
        seed = None
        if isinstance(model, ODEResNet) and model.survival_probabilities() is not None:
            seed = int(torch.randint(0, 2**62, (1,)).item())

        def objective(logits: torch.Tensor) -> torch.Tensor:
            return cross_entropy_objective(logits, yb, self.penalty, wd, every)

        # Objective and gradient of the propagation block on the whole batch.
        with torch.enable_grad(), self._noise(seed):
            feats = model.features(xb)
            logits0 = model.classifier(feats)
            obj = objective(logits0)
            # allow_unused: a step that stochastic depth dropped this iteration has no gradient
            g = [torch.zeros_like(p) if gi is None else gi
                 for p, gi in zip(theta, torch.autograd.grad(obj, theta, allow_unused=True))]
        feats0, logits0 = feats.detach(), logits0.detach()
        loss0 = float(F.cross_entropy(logits0, yb))
        f0 = float(obj.detach())
        del feats, obj

        # Gauss–Newton direction from the subsample.
        n_sub = gn_subsample(s, xb.shape[0])
        xs = xb[:n_sub]
        lam = self.damping
        with stored_states(model), self._noise(seed):
            gn = GaussNewton(lambda p: torch.func.functional_call(model, p, (xs,)), dict(prop))
        reg = QuadraticHessian(self.penalty, theta)

        def apply(v: List[torch.Tensor]) -> List[torch.Tensor]:
            with stored_states(model), self._noise(seed):
                out = axpy(1.0, gn(v), reg(v))
            return axpy(wd + lam, v, out) if wd + lam else out

        cg = conjugate_gradient(apply, [-gi for gi in g], s.cg_iters)
        d = cg.x
        slope = float(dot(g, d))
        if not slope < 0:  # round-off only (G + lambda I is PSD): fall back to steepest descent
            d, slope = [-gi for gi in g], -float(dot(g, g))
        dGd = float(dot(d, cg.Ax)) - lam * float(dot(d, d)) if d is cg.x else 0.0

        trial: Dict[str, torch.Tensor] = {}

        def trial_objective() -> float:
            with torch.no_grad(), self._noise(seed):
                trial["feats"] = model.features(xb)
                trial["logits"] = model.classifier(trial["feats"])
                return float(objective(trial["logits"]))

        a, f1, backtracks = armijo(theta, d, trial_objective, f0, slope, s.lr, s.armijo_c1, s.backtrack,
                                   s.max_backtracks)
        feats1 = trial["feats"] if a > 0 else feats0
        # Decrease of J the Gauss–Newton model m(a d) = a g^T d + a^2/2 d^T G d predicts for the step taken.
        predicted = -(a * slope + 0.5 * a * a * dGd)
        actual = f0 - f1
        rho = actual / predicted if a > 0 and predicted > 0 else None
        if s.damping_adapt:
            self._adapt_damping(rho)

        # Classifier block: Newton–CG on the fixed features of the accepted network.
        newton = newton_cg(model.classifier, feats1, yb, s.classifier_steps, s.classifier_cg_iters,
                           self.penalty, wd, every, s.armijo_c1, s.backtrack, s.max_backtracks)
        with torch.no_grad():
            logits2 = model.classifier(feats1)
        loss2 = float(F.cross_entropy(logits2, yb))

        self.iterations += 1
        info = {
            "loss_before": loss0,
            "loss_after": loss2,
            "objective_before": f0,
            "objective_after_propagation": f1,
            "objective_after": newton.objectives[-1],
            "acc_before": float((logits0.argmax(1) == yb).float().mean()),
            "acc_after": float((logits2.argmax(1) == yb).float().mean()),
            "grad_norm": math.sqrt(float(dot(g, g))),
            "cg_iters": cg.iters,
            "cg_rel_residual": cg.rel_residual,
            "step": a,
            "backtracks": backtracks,
            "predicted_decrease": predicted,
            "actual_decrease": actual,
            "rho": rho,
            "damping": lam,
            "hessian_subsample": n_sub,
            "classifier_newton_steps": len(newton.steps),
            "classifier_cg_iters": newton.total_cg_iters,
            "classifier_backtracks": newton.backtracks,
            # at the start of the last Newton step taken
            "classifier_grad_norm": newton.grad_norms[-1] if newton.grad_norms else 0.0,
        }
        self._accumulate(info)
        return StepOutput(torch.as_tensor(loss0, dtype=torch.float64, device=xb.device), logits0, info)

    def _adapt_damping(self, rho: Optional[float]) -> None:
        """Levenberg–Marquardt: more damping when the model over-promised (rho < 1/4, or no step was taken),
        less when it was trustworthy (rho > 3/4); kept within DAMPING_RANGE (Martens 2010, Sec. 4.1)."""
        if rho is None or rho < RHO_BAD:
            self.damping = min(DAMPING_RANGE[1], max(self.damping, DAMPING_RANGE[0]) * DAMPING_BOOST)
        elif rho > RHO_GOOD:
            self.damping = max(DAMPING_RANGE[0], self.damping * DAMPING_DROP)

    # --- bookkeeping ----------------------------------------------------------------------
    def _reset_epoch(self) -> None:
        self._epoch = {"n": 0, "step": 0.0, "cg": 0, "ccg": 0, "rejected": 0, "backtracks": 0}

    def _accumulate(self, info: Dict[str, float]) -> None:
        e = self._epoch
        e["n"] += 1
        e["step"] += info["step"]
        e["cg"] += info["cg_iters"]
        e["ccg"] += info["classifier_cg_iters"]
        e["rejected"] += info["step"] == 0.0
        e["backtracks"] += info["backtracks"]

    def end_epoch(self) -> None:
        e = self._epoch
        n = max(1, e["n"])
        self._last_epoch = {
            "bcd_iterations": self.iterations,
            "bcd_step_mean": e["step"] / n,
            "bcd_cg_iters": e["cg"],
            "bcd_classifier_cg_iters": e["ccg"],
            "bcd_backtracks_mean": e["backtracks"] / n,
            "bcd_rejected": e["rejected"],
            "bcd_damping": self.damping,
        }
        self._reset_epoch()

    def epoch_stats(self) -> Dict[str, Any]:
        """Last epoch's mean accepted step, CG iterations of both blocks, rejected steps, damping."""
        return dict(self._last_epoch)

    @property
    def lr(self) -> float:
        return self.settings.lr

    def state_dict(self) -> Dict[str, Any]:
        # "optimizer"/"scheduler" stay None so that a first-order rule resuming this checkpoint starts fresh.
        return {"optimizer": None, "scheduler": None, "bcd": {"damping": self.damping, "iterations": self.iterations}}

    def load_state_dict(self, ckpt: Dict[str, Any]) -> None:
        state = ckpt.get("bcd")
        if state:
            self.damping = float(state["damping"])
            self.iterations = int(state["iterations"])

"""The ODE-ResNet: opening layer -> ODE blocks joined by connectives -> classifier.

    y_0 = sigma(L x)                      opening layer, 3x3 conv to C_1 channels
    stage s: dy/dt = F(y; theta_s(t)) on [0, T_s], N_s steps of h_s = T_s / N_s
    between stages: y <- pool_2(sigma(conv_1x1 y))   (C_s -> C_{s+1}, H -> H/2)
                or y <- zero-pad channels(pool_2 y)  (connective=pad, parameter-free; Chang et al. 2018)
    logits = h^d W^T y + mu   (full field)  or  Linear(mean_hw y)   (global average pool)

Shapes: images ``(B, C_in, H, W)``, states ``(B, C_s, H_s, W_s)``, logits ``(B, classes)``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from msnet.errors import MsnetError
from msnet.core.activations import ACTIVATIONS
from msnet.core.integrators import INTEGRATORS, AbstractIntegrator
from msnet.core.residual import RESIDUALS, AbstractResidual
from msnet.core.reversible import odeint_scheme, state_dtype, uses_scheme
from msnet.core.stability import check_scheme, stabilise_, step_ratios
from msnet.registry import Registry


@dataclass
class StageSpec:
    """One ODE block: ``channels`` C, ``layers`` N (time steps), final time ``T`` (h = T/N)."""

    channels: int
    layers: int
    T: float = 1.0


@dataclass
class StochasticDepth:
    """Stochastic depth (Huang, Sun, Liu, Sedra, Weinberger, ECCV 2016) as a stochastic dynamical system.

    Step l = 1..L, counted over the whole network (all stages in order, as Huang et
    al. and Lu et al.'s ``MResNet`` do), survives with probability
    p_l = 1 - (l / L)(1 - p_last): the first step almost always, the last with
    ``p_last``. Training multiplies the step's h F by a gate b_l ~ Bernoulli(p_l),
    one draw per step and forward pass (the whole batch shares it); evaluation
    multiplies it by p_l, the gate's mean (Huang et al., Sec. 3). ``p_last = 1``
    turns it off.
    """

    p_last: float = 1.0


@dataclass
class ModelSpec:
    """Everything needed to rebuild a network; stored in every checkpoint."""

    in_channels: int
    num_classes: int
    image_size: Tuple[int, int]
    stages: List[StageSpec] = field(default_factory=lambda: [StageSpec(16, 4, 1.0)])
    residual: str = "conv_act"
    activation: str = "tanh"
    integrator: str = "euler"
    classifier: str = "full_field"
    stochastic_depth: StochasticDepth = field(default_factory=StochasticDepth)
    connective: str = "conv"  # between stages: "conv" (1x1 conv + pool) or "pad" (pool + zero channels)
    # how gradients are computed, not what is computed: not compared, so a run resumes under either
    backprop: str = field(default="store", compare=False)
    # training keeps each step's h^p rho_j / limit <= step_bound (ODEResNet.bound_steps_); None: unconstrained
    step_bound: Optional[float] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.image_size = tuple(int(s) for s in self.image_size)  # type: ignore[assignment]
        self.stages = [s if isinstance(s, StageSpec) else StageSpec(**s) for s in self.stages]
        if not isinstance(self.stochastic_depth, StochasticDepth):
            self.stochastic_depth = StochasticDepth(**self.stochastic_depth)

    def to_dict(self) -> Dict[str, Any]:
        """Plain-data form (lists, numbers, strings) that survives ``torch.load(weights_only=True)``."""
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelSpec":
        return cls(**d)

    def validate(self) -> None:
        """Fail with one line naming the fix if the spec cannot be built."""
        RESIDUALS.get(self.residual)
        ACTIVATIONS.get(self.activation)
        INTEGRATORS.get(self.integrator)
        CLASSIFIERS.get(self.classifier)
        if not self.stages:
            raise MsnetError("the model needs at least one stage (model.stages)")
        check_p_last(self.stochastic_depth.p_last)
        for i, s in enumerate(self.stages):
            if s.layers < 1 or s.channels < 1 or not s.T > 0:
                raise MsnetError(f"stage {i} needs layers >= 1, channels >= 1 and T > 0 (got {s})")
        widths = [s.channels for s in self.stages]
        check_scheme(INTEGRATORS.get(self.integrator), RESIDUALS.get(self.residual), self.backprop, widths)
        check_connective(self.connective, widths)
        check_step_bound(self.step_bound, INTEGRATORS.get(self.integrator), RESIDUALS.get(self.residual))
        h, w = self.image_size
        shrink = 2 ** (len(self.stages) - 1)
        if h % shrink or w % shrink:
            raise MsnetError(
                f"{len(self.stages)} stages halve the image {len(self.stages) - 1} times, "
                f"but {h}x{w} is not divisible by {shrink}; use fewer stages"
            )


class ODEBlock(nn.Module):
    """One stage: dy/dt = F(y; theta(t)) on [0, T] integrated in N steps of h = T/N.

    Its parameters are per-step tensors with a leading time axis, exposed by name
    through :meth:`step_parameters` (e.g. ``K (N, C, C, 3, 3)``, ``b (N, C)``);
    step j acts on [t_j, t_{j+1}) with t_j = j h (:meth:`time_grid`).
    ``backprop="reversible"`` (reversible integrators only) rebuilds the states in
    backward instead of storing them (:mod:`msnet.core.reversible`); on CUDA it runs
    its convolutions in IEEE float32 unless ``reversible_tf32`` is set
    (:func:`set_reversible_tf32`, ``trainer.reversible_tf32``).
    """

    reversible_tf32: bool = False

    def __init__(
        self, residual: AbstractResidual, integrator: AbstractIntegrator, layers: int, T: float,
        backprop: str = "store",
    ):
        super().__init__()
        check_scheme(type(integrator), type(residual), backprop)
        if backprop == "reversible" and not uses_scheme(integrator):
            raise MsnetError(f"integrator {integrator.name!r} has no reversible step table; use model.backprop=store")
        self.residual = residual
        self.integrator = integrator
        self.backprop = backprop
        self.T = float(T)
        self.params = nn.ParameterDict()
        # probe(j, state): called before each residual evaluation of step j (explicit integrators), or
        # with the whole state y_j before step j (reversible schemes); set only inside step_hook().
        self.probe: Optional[Callable[[int, torch.Tensor], None]] = None
        self.norm_memory: Dict[str, torch.Tensor] = {}  # bound_steps_'s warm power-iteration vectors
        self._build(layers)

    def _build(self, layers: int) -> None:
        shapes = {**self.residual.shapes()}
        own = self.integrator.shapes()
        clash = set(shapes) & set(own)
        if clash:
            raise MsnetError(f"integrator and residual both name parameters {sorted(clash)}")
        shapes.update(own)
        for name, shape in shapes.items():
            self.params[name] = nn.Parameter(torch.empty(layers, *shape))
        self.residual.init_({k: self.params[k] for k in self.residual.shapes()})
        self.integrator.init_({k: self.params[k] for k in own})
        stabilise_(self.integrator, self.residual, self.step_parameters(), self.h)

    @property
    def layers(self) -> int:
        """Number of time steps N."""
        return next(iter(self.params.values())).shape[0]

    @property
    def h(self) -> float:
        """Step size h = T / N."""
        return self.T / self.layers

    def time_grid(self) -> torch.Tensor:
        """Left end t_j = j h of the interval on which step j's parameters act, shape ``(N,)``."""
        return torch.arange(self.layers, dtype=torch.float64) * self.h

    def step_ratios(self) -> Optional[torch.Tensor]:
        """``(N,)``: how far along its stability limit each step is, h^p rho_j / limit (below 1: stable);
        None where the integrator states no condition for this residual (:func:`~msnet.core.stability.step_ratios`)."""
        return step_ratios(self.integrator, self.residual, self.step_parameters(), self.h)

    def bound_steps_(self, max_ratio: float) -> None:
        """Scale, in place, the stencils of every step whose :meth:`step_ratios` exceeds ``max_ratio`` down to it.

        The projection onto the integrator's step-size condition (e.g. leapfrog's h^2 ||K_j||^2 / 4 <= max_ratio,
        h ||K_j|| <= 2 sqrt(max_ratio)) that training applies after every update (``model.step_bound``).
        The norms come from power iterations kept warm in :attr:`norm_memory` (at least two per call after the
        first's 30, more while the stencils move fast): 6-31 % of an Adam step's CPU time on the leapfrog
        preset's widths in the first steps (measured 2026-12-02, docs). No-op where no condition applies.
        """
        stabilise_(self.integrator, self.residual, self.step_parameters(), self.h, max_ratio, self.norm_memory)

    def step_parameters(self) -> Dict[str, nn.Parameter]:
        """The per-step parameters by name, each ``(N, *shape)``."""
        return dict(self.params.items())

    def set_step_parameters(self, values: Dict[str, torch.Tensor]) -> None:
        """Replace every per-step parameter (N may change: the depth becomes ``values[*].shape[0]``).

        Optimisers holding the old parameters must be rebuilt afterwards.
        """
        if set(values) != set(self.params.keys()):
            raise MsnetError(f"expected step parameters {sorted(self.params.keys())}, got {sorted(values)}")
        lengths = {v.shape[0] for v in values.values()}
        if len(lengths) != 1:
            raise MsnetError(f"all step parameters need the same number of steps, got {sorted(lengths)}")
        for name, v in values.items():
            old = self.params[name]
            self.params[name] = nn.Parameter(v.detach().to(device=old.device, dtype=old.dtype).clone())

    def forward(self, y: torch.Tensor, survival: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y(T) from y(0) ``(B, C, H, W)``.

        ``survival`` ``(N,)`` (on the CPU): stochastic depth's survival probability
        p_j of each step. In training mode step j's F is multiplied by a gate
        b_j ~ Bernoulli(p_j) drawn once per call from torch's global RNG (a dropped
        step skips its residual evaluations); in eval mode by p_j. Every integrator
        then gets it for free: Euler steps u + b_j h F(u), LM steps
        u - k_j (u - u_prev) + b_j h F(u), and a Runge-Kutta step drops all its stages.
        Reversible schemes run through :func:`~msnet.core.reversible.odeint_scheme`
        (parts of F evaluated alone; ``backprop``), with the same gates.

        Under autocast (``trainer.precision=bf16``) every integrator keeps the state and its
        additive steps in the parameters' dtype (float32) and only F runs in bfloat16
        (:func:`~msnet.core.reversible.state_dtype`): a bf16 state would drop every update
        below 2^-9 |y|, an error that grows with depth. The output is then float32.
        """
        if uses_scheme(self.integrator):
            scales = None if survival is None else _step_scales(survival, self.training)
            params = self.step_parameters()
            return odeint_scheme(self.integrator, self.residual, y, self.h, params, scales, self.backprop,
                                 self.reversible_tf32, self.probe)
        res_names = list(self.residual.shapes())
        res = [self.params[k] for k in res_names]
        own = {k: self.params[k] for k in self.integrator.shapes()}

        def f(j: int, state: torch.Tensor) -> torch.Tensor:
            if self.probe is not None:
                self.probe(j, state)
            return self.residual(state, {k: p[j] for k, p in zip(res_names, res)})

        if survival is not None:
            f = _gated(f, survival, self.training)
        dtype = next(iter(self.params.values())).dtype
        return self.integrator.integrate(f, state_dtype(y, dtype), self.h, self.layers, own)


def set_reversible_tf32(model: nn.Module, allowed: bool) -> None:
    """Let the reversible stages of ``model`` run TF32 convolutions on CUDA (``allowed``), or not (the default).

    By default a stage with ``backprop="reversible"`` runs its forward and its rebuilding
    backward with cuDNN convolutions in IEEE float32, whatever the global TF32 setting, so
    that its gradients agree with stored-activation backprop to float32 round-off on a
    GPU as on the CPU (:class:`~msnet.core.reversible.PrecisionState`). ``allowed=True``
    leaves them to the global setting (TF32 on Ampere and later by default): faster, and
    measured against the exact path by ``scripts/bench/reversible_precision.py``. Other stages
    and the CPU are unaffected.
    """
    for block in model.modules():
        if isinstance(block, ODEBlock):
            block.reversible_tf32 = bool(allowed)


class FullFieldClassifier(nn.Module):
    """logits = h^d W^T y + mu with W on the image grid (Haber et al. 2018, eq. 5).

    W ``(classes, C, H, W)`` is the discretisation of functions w_j at the cell
    centres of the unit square, so h^d = 1/(H W) and h^d W^T y is the midpoint rule
    for the L2 inner product (w_j, y); that is what lets W move between resolutions.

    The trainable tensor is ``V = h^d W`` (the quadrature weights), initialised like
    ``nn.Linear``. Storing W itself would make every optimiser step on the classifier
    1/h^d times too small in effect (Adam's steps do not scale with the gradient).
    Use :attr:`field_weights` for W and :meth:`set_field_weights` to replace it.
    """

    def __init__(self, channels: int, size: Tuple[int, int], num_classes: int):
        super().__init__()
        h, w = size
        self.hd = 1.0 / (h * w)
        bound = 1.0 / math.sqrt(channels * h * w)
        self.V = nn.Parameter(torch.empty(num_classes, channels, h, w).uniform_(-bound, bound))
        self.mu = nn.Parameter(torch.zeros(num_classes))

    @property
    def field_weights(self) -> torch.Tensor:
        """W = V / h^d, the classifier functions sampled on the grid, ``(classes, C, H, W)``."""
        return self.V / self.hd

    def set_field_weights(self, W: torch.Tensor) -> None:
        """Replace W (the grid may change size: h^d follows W's shape)."""
        self.hd = 1.0 / (W.shape[-2] * W.shape[-1])
        self.V = nn.Parameter((W * self.hd).detach().to(device=self.V.device, dtype=self.V.dtype).clone())

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.linear(y.flatten(1), self.V.flatten(1), self.mu)


class GAPClassifier(nn.Module):
    """logits = A mean_{hw}(y) + mu: global average pooling then a linear layer."""

    def __init__(self, channels: int, size: Tuple[int, int], num_classes: int):
        super().__init__()
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.linear(y.mean(dim=(2, 3)))


CLASSIFIERS: Registry[type[nn.Module]] = Registry("classifier")
CLASSIFIERS.register("full_field")(FullFieldClassifier)
CLASSIFIERS.register("gap")(GAPClassifier)


class Connective(nn.Module):
    """Between stages: y <- avgpool_2(sigma(conv_1x1(y))), C_s -> C_{s+1}, (H, W) -> (H/2, W/2)."""

    def __init__(self, c_in: int, c_out: int, activation: str):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=1)
        self.activation = ACTIVATIONS.get(activation)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.activation(self.conv(y)), 2)


class PadConnective(nn.Module):
    """Between stages, parameter-free: y <- zero-pad channels(avgpool_2(y)), C_s -> C_{s+1} >= C_s.

    Chang et al. 2018's units are joined by 2x pooling and zero-padded channel growth
    (the authors' ``_possible_downsample``). The new channels are split between front
    and back, d/2 each for d = C_{s+1} - C_s, so a (Y, Z) halving of the channels
    carries over: [Y, Z] -> [0, Y | Z, 0]. ``activation`` is accepted and unused.
    """

    def __init__(self, c_in: int, c_out: int, activation: str = "identity"):
        super().__init__()
        self.front = (c_out - c_in) // 2
        self.back = c_out - c_in - self.front

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.pad(F.avg_pool2d(y, 2), (0, 0, 0, 0, self.front, self.back))


CONNECTIVES: Registry[type[nn.Module]] = Registry("model.connective")
CONNECTIVES.register("conv")(Connective)
CONNECTIVES.register("pad")(PadConnective)


def check_connective(name: str, widths: List[int]) -> None:
    """Fail with one line unless connective ``name`` can join stages of these channel counts."""
    CONNECTIVES.get(name)
    if name == "pad" and any(b < a for a, b in zip(widths, widths[1:])):
        raise MsnetError(
            f"model.connective=pad grows channels by zero padding, but the stage widths {widths} shrink; "
            "use model.connective=conv"
        )


class ODEResNet(nn.Module):
    """The whole network, built from a :class:`ModelSpec` (see the module docstring)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        spec.validate()
        self.spec = spec
        act = spec.activation
        self.activation = ACTIVATIONS.get(act)
        first = spec.stages[0].channels
        self.opening = nn.Conv2d(spec.in_channels, first, kernel_size=3, padding=1)
        residual_cls = RESIDUALS.get(spec.residual)
        integrator_cls = INTEGRATORS.get(spec.integrator)
        self.blocks = nn.ModuleList(
            ODEBlock(residual_cls(s.channels, act), integrator_cls(), s.layers, s.T, spec.backprop)
            for s in spec.stages
        )
        self.connectives = nn.ModuleList(
            CONNECTIVES.get(spec.connective)(a.channels, b.channels, act) for a, b in zip(spec.stages[:-1], spec.stages[1:])
        )
        shrink = 2 ** (len(spec.stages) - 1)
        final = (spec.image_size[0] // shrink, spec.image_size[1] // shrink)
        self.classifier = CLASSIFIERS.get(spec.classifier)(spec.stages[-1].channels, final, spec.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The final state y(T) of the last stage, ``(B, C_last, H_last, W_last)``."""
        y = self.activation(self.opening(x))
        survival = self.survival_probabilities()
        for s, block in enumerate(self.blocks):
            if s > 0:
                y = self.connectives[s - 1](y)
            y = block(y, survival[s] if survival is not None else None)
        return y

    @contextlib.contextmanager
    def storing_states(self) -> Iterator[None]:
        """Inside, every stage keeps its states for the backward pass (``backprop=store``), whatever the
        spec says: forward-mode AD (jvp) cannot pass the reversible autograd Function."""
        saved = [b.backprop for b in self.blocks]
        try:
            for b in self.blocks:
                b.backprop = "store"
            yield
        finally:
            for b, old in zip(self.blocks, saved):
                b.backprop = old

    @contextlib.contextmanager
    def step_hook(self, hook_for: Callable[[int], Callable[[int, torch.Tensor], None]]) -> Iterator[None]:
        """Inside, stage s calls ``hook_for(s)(j, state)`` before each residual evaluation of its step j, with
        the state ``(B, C, H, W)`` F is about to see (explicit integrators; msnet.multigrid.datafit reads and
        refits each step's stencil there), or once before step j with the whole state y_j (reversible schemes,
        both backprops; :func:`~msnet.core.reversible.odeint_scheme`). Cleared on the way out, also after an
        exception."""
        try:
            for s, block in enumerate(self.blocks):
                block.probe = hook_for(s)
            yield
        finally:
            for block in self.blocks:
                block.probe = None

    @contextlib.contextmanager
    def state_norms(self) -> Iterator[List[float]]:
        """Inside, record per stage the largest RMS state through depth; yields that list, filled on the way out.

        The RMS of one image's state ``(C, H, W)`` is ||y||_2 / sqrt(C H W) (so stages of different widths
        and resolutions compare); the list's entry s is its largest value over the images of every forward
        pass inside, over stage s's states y_0, ..., y_N (:meth:`step_hook` before each step, on every
        integrator, reversible ones included; the block's output for y_N). A stable network keeps it near
        the opening layer's (O(1)); a blow-up through depth shows as growth by orders of magnitude.
        Reductions stay on the device until the exit (no host synchronisation per step).
        """
        peaks: List[Optional[torch.Tensor]] = [None] * len(self.blocks)
        out = [0.0] * len(self.blocks)

        def seen(s: int, y: torch.Tensor) -> None:
            rms = y.detach().flatten(1).float().norm(dim=1).max() / math.sqrt(y[0].numel())
            peaks[s] = rms if peaks[s] is None else torch.maximum(peaks[s], rms)

        handles = [b.register_forward_hook(lambda _m, _i, y, s=s: seen(s, y)) for s, b in enumerate(self.blocks)]
        try:
            with self.step_hook(lambda s: lambda j, y: seen(s, y)):
                yield out
        finally:
            for h in handles:
                h.remove()
            out[:] = [0.0 if p is None else float(p) for p in peaks]

    def step_ratios(self) -> List[Optional[float]]:
        """Per stage, the largest h^p rho_j / limit over its steps (:meth:`ODEBlock.step_ratios`): below 1 every
        frozen linearised step is stable at every state; None where no condition applies.

        A new network starts at most at 1/2 (:func:`~msnet.core.stability.stabilise_`). Training does not
        keep it there unless ``model.step_bound`` says so (:meth:`bound_steps_`), and mostly need not: the
        presets reach 4-8 after one epoch (scripts/bench/bench_presets.py) with states that stay bounded
        (:meth:`state_norms`), since the bound takes sigma' = 1 at every state."""
        ratios = [b.step_ratios() for b in self.blocks]
        return [None if r is None else float(r.max()) for r in ratios]

    def bound_steps_(self) -> None:
        """Keep every stage's step ratios at most ``spec.step_bound`` (:meth:`ODEBlock.bound_steps_`); the trainer
        calls it after each update. No-op when the spec sets no bound."""
        if self.spec.step_bound is not None:
            for block in self.blocks:
                block.bound_steps_(self.spec.step_bound)

    def survival_probabilities(self) -> Optional[List[torch.Tensor]]:
        """Stochastic depth's p_l per stage, ``(N_stage,)`` float64 each; None when it is off.

        Recomputed from the current depths, so it follows depth schedules.
        """
        p_last = self.spec.stochastic_depth.p_last
        if p_last >= 1.0:
            return None
        depths = self.depth()
        total = sum(depths)
        p = 1.0 - torch.arange(1, total + 1, dtype=torch.float64) / total * (1.0 - p_last)
        return list(torch.split(p, depths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def stage_parameters(self, stage: int) -> Dict[str, nn.Parameter]:
        """Per-step parameters of one stage by name, each ``(N_stage, *shape)``."""
        return self.blocks[stage].step_parameters()

    def time_grid(self, stage: int) -> torch.Tensor:
        """Time grid t_j of one stage, ``(N_stage,)``."""
        return self.blocks[stage].time_grid()

    def depth(self) -> List[int]:
        """Number of layers (time steps) of each stage."""
        return [b.layers for b in self.blocks]

    def sync_spec(self) -> None:
        """Refresh ``spec.stages[*].layers`` after a schedule changed the depth."""
        for s, block in zip(self.spec.stages, self.blocks):
            s.layers = block.layers


def check_p_last(p_last: float) -> None:
    """Fail with one line unless stochastic depth's final survival probability is in (0, 1]."""
    if not 0.0 < p_last <= 1.0:
        raise MsnetError(
            f"model.stochastic_depth.p_last must be in (0, 1] (1 turns stochastic depth off), got {p_last}"
        )


def check_step_bound(bound: Optional[float], integrator_cls: type, residual_cls: type) -> None:
    """Fail with one line unless ``model.step_bound`` is null, or in (0, 1] on an integrator with a step-size
    condition on this residual's spectrum (elsewhere there is nothing to bound)."""
    if bound is None:
        return
    if not 0.0 < bound <= 1.0:
        raise MsnetError(f"model.step_bound must be in (0, 1] (the largest h^p rho / limit kept), or null; got {bound}")
    if integrator_cls.step_limit is None or residual_cls.spectrum not in integrator_cls.stable_for:
        raise MsnetError(
            f"model.step_bound applies to an integrator with a step-size condition on its field, and "
            f"{integrator_cls.name!r} has none on residual {residual_cls.name!r}; set model.step_bound=null"
        )


def _step_scales(survival: torch.Tensor, training: bool) -> List[float]:
    """Stochastic depth's factor on each step's F: a Bernoulli(p_j) draw (training) or p_j (evaluation)."""
    return (torch.bernoulli(survival) if training else survival).tolist()


def _gated(f, survival: torch.Tensor, training: bool):
    """``f`` with step j's output scaled by :func:`_step_scales`; a dropped step never evaluates F."""
    scales = _step_scales(survival, training)

    def gated(j: int, state: torch.Tensor) -> torch.Tensor:
        if scales[j] == 0.0:
            return torch.zeros_like(state)
        out = f(j, state)
        return out if scales[j] == 1.0 else out * scales[j]

    return gated


def build_model(spec: ModelSpec) -> ODEResNet:
    """Build an :class:`ODEResNet` (float32, CPU) from its spec."""
    return ODEResNet(spec)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

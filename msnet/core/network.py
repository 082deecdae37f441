"""The ODE-ResNet: opening layer -> ODE blocks joined by connectives -> classifier.

    y_0 = sigma(L x)                      opening layer, 3x3 conv to C_1 channels
    stage s: dy/dt = F(y; theta_s(t)) on [0, T_s], N_s steps of h_s = T_s / N_s
    between stages: y <- pool_2(sigma(conv_1x1 y))   (C_s -> C_{s+1}, H -> H/2)
    logits = h^d W^T y + mu   (full field)  or  Linear(mean_hw y)   (global average pool)

Shapes: images ``(B, C_in, H, W)``, states ``(B, C_s, H_s, W_s)``, logits ``(B, classes)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from msnet import MsnetError
from msnet.core.activations import ACTIVATIONS
from msnet.core.integrators import INTEGRATORS, AbstractIntegrator
from msnet.core.residual import RESIDUALS, AbstractResidual


@dataclass
class StageSpec:
    """One ODE block: ``channels`` C, ``layers`` N (time steps), final time ``T`` (h = T/N)."""

    channels: int
    layers: int
    T: float = 1.0


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

    def __post_init__(self) -> None:
        self.image_size = tuple(int(s) for s in self.image_size)  # type: ignore[assignment]
        self.stages = [s if isinstance(s, StageSpec) else StageSpec(**s) for s in self.stages]

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
        if self.classifier not in CLASSIFIERS:
            raise MsnetError(
                f"unknown classifier {self.classifier!r}; choose one of: {', '.join(sorted(CLASSIFIERS))}"
            )
        if not self.stages:
            raise MsnetError("the model needs at least one stage (model.stages)")
        for i, s in enumerate(self.stages):
            if s.layers < 1 or s.channels < 1 or not s.T > 0:
                raise MsnetError(f"stage {i} needs layers >= 1, channels >= 1 and T > 0 (got {s})")
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
    """

    def __init__(self, residual: AbstractResidual, integrator: AbstractIntegrator, layers: int, T: float):
        super().__init__()
        self.residual = residual
        self.integrator = integrator
        self.T = float(T)
        self.params = nn.ParameterDict()
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

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        res_names = list(self.residual.shapes())
        res = [self.params[k] for k in res_names]
        own = {k: self.params[k] for k in self.integrator.shapes()}

        def f(j: int, state: torch.Tensor) -> torch.Tensor:
            return self.residual(state, {k: p[j] for k, p in zip(res_names, res)})

        return self.integrator.integrate(f, y, self.h, self.layers, own)


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


CLASSIFIERS = {"full_field": FullFieldClassifier, "gap": GAPClassifier}


class Connective(nn.Module):
    """Between stages: y <- avgpool_2(sigma(conv_1x1(y))), C_s -> C_{s+1}, (H, W) -> (H/2, W/2)."""

    def __init__(self, c_in: int, c_out: int, activation: str):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=1)
        self.activation = ACTIVATIONS.get(activation)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.activation(self.conv(y)), 2)


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
            ODEBlock(residual_cls(s.channels, act), integrator_cls(), s.layers, s.T) for s in spec.stages
        )
        self.connectives = nn.ModuleList(
            Connective(a.channels, b.channels, act) for a, b in zip(spec.stages[:-1], spec.stages[1:])
        )
        shrink = 2 ** (len(spec.stages) - 1)
        final = (spec.image_size[0] // shrink, spec.image_size[1] // shrink)
        self.classifier = CLASSIFIERS[spec.classifier](spec.stages[-1].channels, final, spec.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The final state y(T) of the last stage, ``(B, C_last, H_last, W_last)``."""
        y = self.activation(self.opening(x))
        for s, block in enumerate(self.blocks):
            if s > 0:
                y = self.connectives[s - 1](y)
            y = block(y)
        return y

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


def build_model(spec: ModelSpec) -> ODEResNet:
    """Build an :class:`ODEResNet` (float32, CPU) from its spec."""
    return ODEResNet(spec)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

"""The ODE-ResNet core: residual fields, integrators, reversible schemes, stability, the network. No Hydra, no files."""

from msnet.core.activations import ACTIVATIONS
from msnet.core.device import resolve_device, resolve_dtype
from msnet.core.integrators import INTEGRATORS, AbstractIntegrator, ExplicitRungeKutta
from msnet.core.multistep import LinearMultistep
from msnet.core.network import (
    CLASSIFIERS, ModelSpec, ODEBlock, ODEResNet, StageSpec, StochasticDepth, build_model, count_parameters,
)
from msnet.core.residual import RESIDUALS, AbstractResidual
from msnet.core.reversible import odeint_scheme
from msnet.core.schemes import ReversibleScheme

__all__ = [
    "ACTIVATIONS", "INTEGRATORS", "RESIDUALS", "CLASSIFIERS",
    "AbstractIntegrator", "AbstractResidual", "ExplicitRungeKutta",
    "ModelSpec", "StageSpec", "StochasticDepth", "ODEBlock", "ODEResNet", "LinearMultistep",
    "build_model", "count_parameters", "resolve_device", "resolve_dtype",
    "ReversibleScheme", "odeint_scheme",
]

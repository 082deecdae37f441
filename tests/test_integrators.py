"""Integrators: convergence order on a linear ODE with a known solution, gradcheck, registry facts."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from msnet.core import INTEGRATORS, RESIDUALS, ModelSpec, StageSpec, build_model
from msnet.core.network import ODEBlock
from msnet.core.residual import ConvAct

# Schemes for a partitioned field (parts of F, e.g. the Hamiltonian (Y, Z) split) cannot step the
# plain conv_act residual used here; test_reversible.py checks their order on a linear partitioned ODE.
ONE_STEP = [
    n for n in INTEGRATORS.names()
    if INTEGRATORS.get(n).history == 1 and not getattr(INTEGRATORS.get(n), "parts", ())
]


def residual_for(name: str) -> str:
    """``conv_act``, or the first registered residual with the parts integrator ``name`` steps."""
    needs = set(getattr(INTEGRATORS.get(name), "parts", ()))
    if not needs:
        return "conv_act"
    return next(r for r in RESIDUALS.names() if needs <= set(getattr(RESIDUALS.get(r), "parts", ())))


def conv_matrix(K: torch.Tensor, c: int, s: int) -> torch.Tensor:
    """Dense matrix of y -> conv2d(y, K, padding=1) on (c, s, s) images (zero boundary)."""
    eye = torch.eye(c * s * s, dtype=K.dtype).reshape(-1, c, s, s)
    cols = torch.nn.functional.conv2d(eye, K, None, padding=1)
    return cols.reshape(c * s * s, -1).T


def linear_block(name: str, n_steps: int, K: torch.Tensor, T: float) -> ODEBlock:
    residual = ConvAct(K.shape[0], activation="identity")
    block = ODEBlock(residual, INTEGRATORS.get(name)(), n_steps, T).double()
    with torch.no_grad():
        block.params["K"].copy_(K.expand(n_steps, *K.shape))
        block.params["b"].zero_()
    return block


@pytest.mark.parametrize("name", ONE_STEP)
def test_convergence_order_on_linear_ode(name):
    """dy/dt = A y with A a fixed 3x3 convolution: y(T) = expm(T A) y0. Fit log error vs log h."""
    torch.manual_seed(0)
    c, s, T = 2, 5, 1.0
    K = torch.randn(c, c, 3, 3, dtype=torch.float64) * 0.4
    y0 = torch.randn(1, c, s, s, dtype=torch.float64)
    A = conv_matrix(K, c, s)
    exact = (torch.linalg.matrix_exp(T * A) @ y0.flatten()).reshape(y0.shape)
    order = INTEGRATORS.get(name).order
    steps = [4, 8, 16, 32] if order < 4 else [4, 6, 8, 12]
    errors = []
    for n in steps:
        with torch.no_grad():
            y = linear_block(name, n, K, T)(y0)
        errors.append((y - exact).norm().item() / exact.norm().item())
    hs = [T / n for n in steps]
    slope = (
        (len(hs) * sum(math.log(h) * math.log(e) for h, e in zip(hs, errors))
         - sum(map(math.log, hs)) * sum(map(math.log, errors)))
        / (len(hs) * sum(math.log(h) ** 2 for h in hs) - sum(map(math.log, hs)) ** 2)
    )
    assert abs(slope - order) < 0.2, (name, slope, errors)
    assert errors[-1] < errors[0]


def test_euler_block_is_a_resnet():
    """A forward-Euler block is y_{j+1} = y_j + h tanh(K_j y_j + b_j), step for step."""
    torch.manual_seed(1)
    block = ODEBlock(ConvAct(3, "tanh"), INTEGRATORS.get("euler")(), 5, 2.0).double()
    y = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    ref = y.clone()
    for j in range(5):
        ref = ref + 0.4 * torch.tanh(torch.nn.functional.conv2d(ref, block.params["K"][j], block.params["b"][j], padding=1))
    torch.testing.assert_close(block(y), ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", INTEGRATORS.names())
def test_gradcheck_small_network(name):
    """float64 gradcheck of a two-stage network with respect to the input and every parameter."""
    torch.manual_seed(0)
    spec = ModelSpec(
        1, 3, (4, 4), [StageSpec(2, 2, 1.0), StageSpec(2, 2, 0.5)], integrator=name, residual=residual_for(name)
    )
    model = build_model(spec).double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    inputs = (x, *[p.detach().clone().requires_grad_(True) for p in model.parameters()])
    names = [n for n, _ in model.named_parameters()]

    def g(x, *ps):
        return functional_call(model, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(g, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", INTEGRATORS.names())
def test_registry_facts(name):
    cls = INTEGRATORS.get(name)
    facts = cls.facts()
    assert facts["name"] == name
    assert isinstance(facts["order"], int) and facts["order"] >= 1
    assert isinstance(facts["reversible"], bool)
    assert facts["history"] >= 1 and facts["stages"] >= 1

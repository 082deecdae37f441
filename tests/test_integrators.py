"""Integrators: convergence order on a linear ODE with a known solution, gradcheck, registry facts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.func import functional_call

from msnet.core import INTEGRATORS, RESIDUALS, ExplicitRungeKutta, ModelSpec, ReversibleScheme, StageSpec, build_model
from msnet.core.multistep import lmm_order
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


RUNGE_KUTTA = [n for n in INTEGRATORS.names() if issubclass(INTEGRATORS.get(n), ExplicitRungeKutta)]


def butcher_order(a, b, max_order: int = 4) -> int:
    """The largest p <= ``max_order`` whose Butcher order conditions (rooted trees up to p nodes) all hold.

    Hairer, Norsett, Wanner, *Solving ODEs I*, Table II.2.2, with c_i = sum_j a_ij (the row sums):
    p = 1: sum b = 1; p = 2: b.c = 1/2; p = 3: b.c^2 = 1/3, b.Ac = 1/6;
    p = 4: b.c^3 = 1/4, b.(c * Ac) = 1/8, b.Ac^2 = 1/12, b.AAc = 1/24. Float64, to 1e-14.
    """
    s = len(b)
    A = torch.zeros(s, s, dtype=torch.float64)
    for i, row in enumerate(a):
        A[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
    bv = torch.tensor(b, dtype=torch.float64)
    c = A.sum(1)
    conditions = {
        1: [(bv.sum(), 1.0)],
        2: [(bv @ c, 1 / 2)],
        3: [(bv @ c**2, 1 / 3), (bv @ A @ c, 1 / 6)],
        4: [(bv @ c**3, 1 / 4), (bv @ (c * (A @ c)), 1 / 8), (bv @ A @ c**2, 1 / 12), (bv @ A @ A @ c, 1 / 24)],
    }
    order = 0
    for p in range(1, max_order + 1):
        if any(abs(float(got) - want) > 1e-14 for got, want in conditions[p]):
            break
        order = p
    return order


def test_butcher_order_knows_textbook_tableaus():
    """The order-condition counter itself, on tableaus of known order (HNW Table II.1.1-2)."""
    assert butcher_order(((),), (1.0,)) == 1  # Euler
    assert butcher_order(((), (0.5,)), (0.0, 1.0)) == 2  # explicit midpoint
    assert butcher_order(((), (1 / 3,), (0.0, 2 / 3)), (1 / 4, 0.0, 3 / 4)) == 3  # Heun's third-order method
    three_eighths = ((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0))
    assert butcher_order(three_eighths, (1 / 8, 3 / 8, 3 / 8, 1 / 8)) == 4  # Kutta's 3/8 rule
    # the 3/8 rule's weights on the classical nodes: consistent and second order, no more
    assert butcher_order(((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 8, 3 / 8, 3 / 8, 1 / 8)) == 2


@pytest.mark.parametrize("name", RUNGE_KUTTA)
def test_runge_kutta_tableau_satisfies_the_order_conditions_of_its_order(name):
    """The registry's ``order`` is the tableau's order from Butcher's conditions (all trees up to order 4,
    nonlinear ones included, which a linear test ODE cannot see), and ``stages`` its number of rows."""
    cls = INTEGRATORS.get(name)
    assert len(cls.a) == len(cls.b) == cls.stages
    assert all(len(row) == i for i, row in enumerate(cls.a))  # explicit: strictly lower triangular
    assert cls.order <= 4  # the conditions below go to order 4
    assert butcher_order(cls.a, cls.b) == cls.order


@pytest.mark.parametrize("name", RUNGE_KUTTA)
def test_runge_kutta_step_is_its_tableau(name):
    """One step on a nonlinear field equals k_i = f(y + h sum_j a_ij k_j), y + h sum_i b_i k_i written out
    here, so the order conditions checked on the tableau hold for what the code computes."""
    cls = INTEGRATORS.get(name)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, 3, generator=g, dtype=torch.float64)
    h, j = 0.3, 2

    def f(step, u):
        return torch.tanh(u @ W.T + 0.1 * step) * u.sum(1, keepdim=True)

    ks = []
    for row in cls.a:
        ks.append(f(j, y + h * sum((aij * k for aij, k in zip(row, ks)), torch.zeros_like(y))))
    want = y + h * sum(bi * k for bi, k in zip(cls.b, ks))
    torch.testing.assert_close(cls().step(f, j, h, y), want, rtol=0, atol=1e-15)


def split_block(block: ODEBlock, start: int, stop: int) -> ODEBlock:
    """Steps ``start:stop`` of ``block`` as a block of their own (same h)."""
    part = copy.deepcopy(block)
    part.T = block.h * (stop - start)
    part.set_step_parameters({k: p[start:stop] for k, p in block.step_parameters().items()})
    return part


@pytest.mark.parametrize("name", INTEGRATORS.names())
def test_registry_facts(name):
    """Each fact against a value computed from the scheme, not just its type.

    ``stages``: residual evaluations per step, counted. ``history``: 1 exactly when the scheme is
    one-step, i.e. when restarting from y_1 with the remaining steps reproduces y_N. ``order``: from
    Butcher's conditions (Runge-Kutta) or the multistep order conditions (in the learnable k range);
    the reversible schemes' order is the fitted slope of test_reversible.py, which fails for a scheme
    without a test problem. ``reversible``: the scheme has the inverse step test_reversible.py checks.
    """
    cls = INTEGRATORS.get(name)
    facts = cls.facts()
    assert facts["name"] == name and isinstance(facts["reversible"], bool)
    torch.manual_seed(0)
    n, c = 5, 4
    block = ODEBlock(RESIDUALS.get(residual_for(name))(c, "tanh"), cls(), n, 1.0).double()
    with torch.no_grad():
        for p in block.params.values():
            p.add_(0.1 * torch.randn_like(p))  # nonzero biases and per-step k
    assert block.layers == n and all(p.shape[0] == n for p in block.step_parameters().values())
    y0 = torch.randn(2, c, 5, 5, dtype=torch.float64)

    calls = []

    def f(j, y):
        calls.append(j)
        return block.residual(y, {k: p[j] for k, p in block.params.items()})

    with torch.no_grad():  # the registry's generic API: every residual evaluation goes through f
        block.integrator.integrate(f, y0, block.h, n, {k: block.params[k] for k in block.integrator.shapes()})
    assert sorted(calls) == [j for j in range(n) for _ in range(facts["stages"])], (name, calls)

    with torch.no_grad():
        whole = block(y0)
        restarted = split_block(block, 1, n)(split_block(block, 0, 1)(y0))
    one_step = torch.allclose(restarted, whole, rtol=0, atol=1e-13)
    assert facts["history"] in (1, 2) and one_step == (facts["history"] == 1), (name, facts["history"])

    if issubclass(cls, ExplicitRungeKutta):
        assert butcher_order(cls.a, cls.b) == facts["order"]
    elif hasattr(cls, "coefficients"):
        low, high = cls.k_init  # coefficients exact in binary (lmm_order's rational arithmetic) inside that range
        ks = [k for k in (-0.0625, -0.03125, 0.0) if low <= k <= high]
        assert ks and {lmm_order(*cls.coefficients(k)) for k in ks} == {facts["order"]}
    else:
        assert facts["reversible"], f"{name}: no computed order; add its order conditions or a slope test"
    assert facts["reversible"] == isinstance(block.integrator, ReversibleScheme)
    assert facts["per_step_params"] is True or not block.step_parameters()

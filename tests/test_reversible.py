"""Reversible integrators (Chang et al. 2018): exact inverse steps, reversible backprop, stability, plumbing.

Every test that is about "the reversible integrators" walks the registry, so a new
reversible scheme is picked up without editing this file.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from msnet import MsnetError
from msnet.config import Backprop
from msnet.core import INTEGRATORS, RESIDUALS, ModelSpec, StageSpec, StochasticDepth, build_model
from msnet.core.network import ODEBlock, PadConnective
from msnet.core.residual import HamiltonianResidual
from msnet.core.reversible import odeint_scheme
from msnet.core.schemes import BACKPROPS, residual_evaluator
from msnet.core.stability import stable_fields
from msnet.training import train
from msnet.training.setup import check_config

from .conftest import loglog_slope
from .test_integrators import conv_matrix

REVERSIBLE = [n for n in INTEGRATORS.names() if INTEGRATORS.get(n).reversible]


pytestmark = pytest.mark.usefixtures("one_thread")

# Reconstruction tolerances for 64 steps of size h = 1/32 with random_block's weights, relative to
# max |y|. Round-off (eps = 1.1e-16 / 6e-8) accumulates along the 64 inverse steps, most for leapfrog,
# whose inverse 2 Y_j - Y_{j+1} + ... cancels. Measured worst cases (all states): float64 2e-16
# (hamiltonian, midpoint), 4e-15 (leapfrog); float32 1.4e-7 (hamiltonian, midpoint), 4e-6 (leapfrog).
RECONSTRUCT_TOL = {torch.float64: 1e-12, torch.float32: 5e-5}
# The reconstruction and gradient checks run on every device there is: CUDA on a GPU machine (CI has none;
# the `cuda` marker skips them there, and `pytest -m cuda` in scripts/gpu_check.sh selects them).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def residual_for(name: str) -> str:
    """``conv_act``, or the first registered residual with the parts integrator ``name`` steps."""
    needs = set(getattr(INTEGRATORS.get(name), "parts", ()))
    if needs:
        return next(r for r in RESIDUALS.names() if needs <= set(getattr(RESIDUALS.get(r), "parts", ())))
    return "conv_act"


# (integrator, residual): every reversible scheme on the fields it is stable on (its ``stable_for`` spectrum,
# e.g. midpoint on conv_antisym and hamiltonian) and on residual_for's (conv_act: the plain midpoint and leapfrog)
SCHEME_FIELDS = sorted({(n, r) for n in REVERSIBLE for r in [residual_for(n), *stable_fields(INTEGRATORS.get(n))]})
SCHEME_IDS = [f"{n}-{r}" for n, r in SCHEME_FIELDS]


def random_block(
    name: str, n: int, T: float, c: int = 4, dtype=torch.float64, activation="tanh", seed=0, residual=None,
) -> ODEBlock:
    """An N-step block of integrator ``name`` with N(0, s^2) weights (s ~ 1.5/sqrt(fan_in)), biases N(0, 0.01)."""
    torch.manual_seed(seed)
    residual = RESIDUALS.get(residual or residual_for(name))(c, activation)
    block = ODEBlock(residual, INTEGRATORS.get(name)(), n, T).to(dtype)
    with torch.no_grad():
        for k, p in block.params.items():
            if p.dim() > 2:
                p.normal_(0.0, 0.5 / math.sqrt(p.shape[-1] * p.shape[-2] * p.shape[-3]) * 3)
            else:
                p.normal_(0.0, 0.1)
    return block


def trajectory(block: ODEBlock, y0: torch.Tensor):
    """All states of the block's scheme, from before step 0 to after step N-1."""
    scheme, params = block.integrator, block.step_parameters()
    states = [scheme.start(y0)]
    for j in range(block.layers):
        theta = {k: p[j] for k, p in params.items()}
        states.append(scheme.step(residual_evaluator(block.residual, theta), j, block.h, states[-1]))
    return states


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name,residual", SCHEME_FIELDS, ids=SCHEME_IDS)
def test_inverse_steps_rebuild_every_state(name, residual, dtype, device):
    """Run 64 steps forward, then 64 inverse steps from the last state: every state comes back."""
    block = random_block(name, 64, 2.0, dtype=dtype, residual=residual).to(device)
    y0 = torch.randn(3, 4, 6, 6, dtype=dtype).to(device)
    with torch.no_grad():
        states = trajectory(block, y0)
        scale = max(s.abs().max().item() for st in states for s in st)
        state = states[-1]
        worst = 0.0
        params = block.step_parameters()
        for j in reversed(range(block.layers)):
            theta = {k: p[j] for k, p in params.items()}
            state = block.integrator.inverse_step(residual_evaluator(block.residual, theta), j, block.h, state)
            worst = max(worst, max((a - b).abs().max().item() for a, b in zip(state, states[j])) / scale)
        rebuilt = block.integrator.finish(state)
    assert worst < RECONSTRUCT_TOL[dtype], worst
    assert (rebuilt - y0).abs().max().item() / scale < RECONSTRUCT_TOL[dtype]


def two_stage_model(name: str, backprop: str, connective: str = "pad", p_last: float = 1.0, residual=None):
    torch.manual_seed(0)
    spec = ModelSpec(
        1, 3, (8, 8), [StageSpec(4, 5, 1.0), StageSpec(8, 7, 2.0)], residual=residual or residual_for(name),
        integrator=name, classifier="gap", connective=connective, backprop=backprop,
        stochastic_depth=StochasticDepth(p_last),
    )
    return build_model(spec).double()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("connective", ["pad", "conv"])
@pytest.mark.parametrize("name,residual", SCHEME_FIELDS, ids=SCHEME_IDS)
def test_reversible_gradients_equal_stored_ones(name, residual, connective, device):
    """float64: d loss / d(input, every parameter) of backprop=reversible equals backprop=store to 1e-10."""
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64).to(device)
    grads = {}
    for backprop in ("store", "reversible"):
        model = two_stage_model(name, backprop, connective, residual=residual).to(device)
        xi = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(xi), torch.tensor([0, 1, 2, 0, 1], device=device))
        loss.backward()
        grads[backprop] = [xi.grad] + [p.grad for p in model.parameters()]
    for a, b in zip(grads["store"], grads["reversible"]):
        assert b is not None
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10 * max(1.0, a.abs().max().item()))


@pytest.mark.parametrize("name", REVERSIBLE)
def test_reversible_backprop_follows_stochastic_depth_gates(name):
    """With stochastic depth the reversible backward replays the forward's gates (same seed, same gradients)."""
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    grads = {}
    for backprop in ("store", "reversible"):
        model = two_stage_model(name, backprop, p_last=0.5).train()
        torch.manual_seed(3)
        model(x).square().sum().backward()
        grads[backprop] = [p.grad for p in model.parameters()]
    for a, b in zip(grads["store"], grads["reversible"]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10 * max(1.0, a.abs().max().item()))


@pytest.mark.parametrize("name,residual", SCHEME_FIELDS, ids=SCHEME_IDS)
def test_gradcheck_reversible_backprop(name, residual):
    """float64 gradcheck of a two-stage network trained with backprop=reversible, input and every parameter."""
    torch.manual_seed(0)
    spec = ModelSpec(
        1, 3, (4, 4), [StageSpec(2, 3, 1.0), StageSpec(4, 2, 0.5)], residual=residual,
        integrator=name, connective="pad", backprop="reversible",
    )
    model = build_model(spec).double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in model.named_parameters()]
    inputs = (x, *[p.detach().clone().requires_grad_(True) for p in model.parameters()])

    def g(x, *ps):
        return functional_call(model, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(g, inputs, eps=1e-6, atol=1e-6)



def linear_problem(name: str, c: int, s: int):
    """A block with identity activation, zero biases and constant stencils, and its exact y(T) map.

    midpoint    y' = A y                          y(T) = expm(T A) y0
    leapfrog    y'' = A y, y'(0) = 0               from expm of [[0, I], [A, 0]]
    hamiltonian Y' = A1^T A1 Z, Z' = -A2^T A2 Y    expm of [[0, A1^T A1], [-A2^T A2, 0]]
    """
    torch.manual_seed(1)
    dt = torch.float64
    if name == "hamiltonian":
        K1, K2 = (torch.randn(c // 2, c // 2, 3, 3, dtype=dt) * 0.3 for _ in range(2))
        A1, A2 = conv_matrix(K1, c // 2, s), conv_matrix(K2, c // 2, s)
        m = A1.shape[0]
        G = torch.zeros(2 * m, 2 * m, dtype=dt)
        G[:m, m:], G[m:, :m] = A1.T @ A1, -A2.T @ A2
        return {"K1": K1, "K2": K2}, lambda T, y0: (torch.linalg.matrix_exp(T * G) @ y0.flatten()).reshape(y0.shape)
    K = torch.randn(c, c, 3, 3, dtype=dt) * 0.3
    A = conv_matrix(K, c, s)
    m = A.shape[0]
    if name == "midpoint":
        return {"K": K}, lambda T, y0: (torch.linalg.matrix_exp(T * A) @ y0.flatten()).reshape(y0.shape)
    if name == "leapfrog":
        G = torch.zeros(2 * m, 2 * m, dtype=dt)
        G[:m, m:], G[m:, :m] = torch.eye(m, dtype=dt), A
        return {"K": K}, lambda T, y0: (
            torch.linalg.matrix_exp(T * G) @ torch.cat([y0.flatten(), torch.zeros(m, dtype=dt)])
        )[:m].reshape(y0.shape)
    # A registered reversible scheme without an exact solution here would otherwise pass untested.
    pytest.fail(f"no linear test problem for reversible integrator {name!r}: add one to linear_problem", pytrace=False)


@pytest.mark.parametrize("name", REVERSIBLE)
def test_convergence_order_on_linear_problem(name):
    """The fitted slope of log error against log h matches the registry's ``order``."""
    c, s, T = 2, 4, 1.0
    stencils, exact = linear_problem(name, c, s)
    y0 = torch.randn(1, c, s, s, dtype=torch.float64)
    ref = exact(T, y0)
    steps, errors = [8, 16, 32, 64], []
    for n in steps:
        residual = RESIDUALS.get(residual_for(name))(c, "identity")
        block = ODEBlock(residual, INTEGRATORS.get(name)(), n, T).double()
        with torch.no_grad():
            for k, p in block.params.items():
                p.copy_(stencils[k].expand_as(p)) if k in stencils else p.zero_()
            errors.append(((block(y0) - ref).norm() / ref.norm()).item())
    order = loglog_slope([T / n for n in steps], errors)
    assert abs(order - INTEGRATORS.get(name).order) < 0.2, (name, order, errors)


def euler_second_order(block: ODEBlock, y0: torch.Tensor) -> torch.Tensor:
    """Forward Euler on the first-order form (Y, V)' = (V, F(Y)), V(0) = 0, with the block's weights."""
    params, y, v = block.step_parameters(), y0, torch.zeros_like(y0)
    for j in range(block.layers):
        f = block.residual(y, {k: p[j] for k, p in params.items()})
        y, v = y + block.h * v, v + block.h * f
    return y


def autonomous_block(name: str, residual: str, n: int, T: float, c: int, seed: int) -> ODEBlock:
    """N steps of one random field, the same at every step: stencils N(0, 1/fan_in), zero biases, tanh."""
    torch.manual_seed(seed)
    block = ODEBlock(RESIDUALS.get(residual)(c, "tanh"), INTEGRATORS.get(name)(), n, T).double()
    with torch.no_grad():
        for p in block.params.values():
            one = torch.randn(p.shape[1:], dtype=p.dtype) / math.sqrt(9 * p.shape[2]) if p.dim() > 2 else 0.0 * p[0]
            p.copy_(one.expand_as(p))
    return block


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["hamiltonian", "leapfrog"])
def test_stable_where_forward_euler_is_not(name, seed):
    """Random weights, h = 1/4, T = 8, 32, 128: ||y(T)|| / ||y(0)|| stays in [1/4, 4]; forward Euler passes 100.

    The setting of the paper's stability argument: an autonomous field (one random
    stencil set for all steps) near y = 0 (||y0|| small, so the Jacobian decides),
    where the Hamiltonian and leapfrog fields have imaginary eigenvalues i omega.
    Symplectic Euler and leapfrog are stable for h omega < 2 (here h omega < 1);
    forward Euler of the same ODE with the same weights (the registered ``euler`` on
    ``residual=hamiltonian``; for leapfrog the first-order system (Y, V)' = (V, F(Y)))
    amplifies by sqrt(1 + h^2 omega^2) per step, until tanh saturates.
    """
    h, c, T = 0.25, 8, 128.0
    n = int(T / h)
    residual = {"hamiltonian": "hamiltonian", "leapfrog": "conv_sym"}[name]  # the paper's fields
    torch.manual_seed(100 + seed)
    y0 = 1e-3 * torch.randn(2, c, 6, 6, dtype=torch.float64)
    block = autonomous_block(name, residual, n, T, c, seed)
    with torch.no_grad():
        states = trajectory(block, y0)  # an autonomous field: y(8) and y(32) lie on the way to y(128)
        for t in (8.0, 32.0, 128.0):
            ratio = (block.integrator.finish(states[int(t / h)]).norm() / y0.norm()).item()
            assert 0.25 <= ratio <= 4.0, (name, t, ratio)
        if name == "hamiltonian":
            euler = ODEBlock(block.residual, INTEGRATORS.get("euler")(), n, T).double()
            euler.set_step_parameters(block.step_parameters())
            euler_ratio = (euler(y0).norm() / y0.norm()).item()
        else:
            euler_ratio = (euler_second_order(block, y0).norm() / y0.norm()).item()
    assert euler_ratio > 100.0, (name, euler_ratio)


def saved_activation_bytes(model, x) -> int:
    """Bytes autograd keeps for backward (distinct storages), parameters excluded."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).square().sum()
    loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("name", REVERSIBLE)
def test_reversible_activation_memory_does_not_grow_with_depth(name):
    """Saved bytes at depth 32 are within 1.2x of depth 4 with reversible backprop, and ~8x with store."""
    x = torch.randn(4, 1, 8, 8)
    used = {}
    for backprop in ("store", "reversible"):
        for depth in (4, 32):
            torch.manual_seed(0)
            spec = ModelSpec(1, 3, (8, 8), [StageSpec(4, depth, 1.0)], residual=residual_for(name),
                             integrator=name, backprop=backprop)
            used[backprop, depth] = saved_activation_bytes(build_model(spec), x)
    assert used["reversible", 32] <= 1.2 * used["reversible", 4]
    assert used["store", 32] >= 4 * used["store", 4]


def test_pad_connective_keeps_the_hamiltonian_halves():
    """[Y, Z] -> [0, pool Y | pool Z, 0]: the (Y, Z) split of the wider stage holds the old halves."""
    y = torch.randn(2, 4, 6, 6)
    out = PadConnective(4, 8)(y)
    pooled = torch.nn.functional.avg_pool2d(y, 2)
    Y, Z = out.chunk(2, dim=1)
    assert out.shape == (2, 8, 3, 3)
    torch.testing.assert_close(Y[:, 2:], pooled[:, :2])
    torch.testing.assert_close(Z[:, :2], pooled[:, 2:])
    assert Y[:, :2].abs().max() == 0 and Z[:, 2:].abs().max() == 0


def test_hamiltonian_residual_parts_make_the_field():
    res = HamiltonianResidual(6, "relu")
    theta = {k: torch.randn(*s) for k, s in res.shapes().items()}
    y = torch.randn(2, 6, 5, 5)
    Y, Z = y.chunk(2, dim=1)
    F = res(y, theta)
    expected_y = torch.nn.functional.conv_transpose2d(
        torch.relu(torch.nn.functional.conv2d(Z, theta["K1"], theta["b1"], padding=1)), theta["K1"], padding=1)
    torch.testing.assert_close(F[:, :3], expected_y)
    torch.testing.assert_close(F[:, 3:], res.part("z", Y, theta))


def test_generic_integrate_api_agrees_with_the_block():
    """``integrator.integrate(f, ...)`` (the registry's API, through f alone) gives the block's result."""
    block = random_block("hamiltonian", 5, 1.0)
    params = block.step_parameters()
    y0 = torch.randn(2, 4, 5, 5, dtype=torch.float64)

    def f(j, y):
        return block.residual(y, {k: p[j] for k, p in params.items()})

    with torch.no_grad():
        torch.testing.assert_close(block.integrator.integrate(f, y0, block.h, block.layers, {}), block(y0))
        torch.testing.assert_close(
            odeint_scheme(block.integrator, block.residual, y0, block.h, params, backprop="reversible"), block(y0))


def one_line_error(fn) -> str:
    with pytest.raises(MsnetError) as err:
        fn()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_choices_fail_with_one_line():
    msg = one_line_error(lambda: ModelSpec(1, 3, (8, 8), integrator="euler", backprop="reversible").validate())
    assert all(n in msg for n in REVERSIBLE) and "model.integrator" in msg
    msg = one_line_error(lambda: ModelSpec(1, 3, (8, 8), integrator="hamiltonian").validate())
    assert "model.residual=" in msg and "hamiltonian" in msg
    msg = one_line_error(lambda: ModelSpec(1, 3, (8, 8), [StageSpec(3, 2)], integrator="hamiltonian",
                                           residual="hamiltonian").validate())
    assert "divisible by 2" in msg
    msg = one_line_error(lambda: ModelSpec(1, 3, (8, 8), [StageSpec(8, 2), StageSpec(4, 2)],
                                           connective="pad").validate())
    assert "model.connective=conv" in msg
    one_line_error(lambda: ModelSpec(1, 3, (8, 8), backprop="adjoint").validate())
    one_line_error(lambda: ModelSpec(1, 3, (8, 8), connective="maxpool").validate())


def test_config_checks_come_before_data(compose_cfg):
    cfg = compose_cfg("train", ["model=hamiltonian", "model.backprop=reversible"])
    check_config(cfg)
    for model in ("midpoint", "leapfrog"):
        check_config(compose_cfg("train", [f"model={model}", "model.backprop=reversible"]))
    msg = one_line_error(lambda: check_config(compose_cfg("train", ["model.backprop=reversible"])))
    assert "hamiltonian" in msg
    one_line_error(lambda: check_config(compose_cfg("train", ["model=hamiltonian", "model.residual=conv_act"])))
    one_line_error(lambda: check_config(compose_cfg("train", ["model=hamiltonian", "model.widths=[32,64]"])))


def test_old_specs_still_load():
    """A checkpoint's spec from before ``connective``/``backprop`` rebuilds; backprop is not compared."""
    old = ModelSpec(1, 10, (8, 8), [StageSpec(4, 2)]).to_dict()
    del old["connective"], old["backprop"]
    spec = ModelSpec.from_dict(old)
    assert spec.connective == "conv" and spec.backprop == "store"
    assert ModelSpec.from_dict({**old, "backprop": "reversible"}) == spec


def test_short_training_run_reversible_equals_store(tiny_cfg, tmp_path):
    """Same seed, synthetic data: reversible backprop trains to the same numbers as store (round-off apart)."""
    summaries = {}
    for backprop in ("store", "reversible"):
        cfg = tiny_cfg([
            "model.integrator=hamiltonian", "model.residual=hamiltonian", "model.layers=6",
            f"model.backprop={backprop}",
        ])
        summaries[backprop] = train(cfg, tmp_path / backprop)
    a, b = summaries["store"], summaries["reversible"]
    assert a["status"] == b["status"] == "completed"
    assert a["final_test_acc"] > 0.4  # 4 classes: chance is 0.25
    for key in ("final_test_acc", "final_val_acc", "final_train_acc"):
        assert abs(a[key] - b[key]) <= 0.01, key
    for key in ("final_test_loss", "final_train_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-4), key


def test_the_core_backprops_are_the_schema_choices():
    """``BACKPROPS`` (the core, which imports no Hydra and so not msnet.config) lists the ``Backprop`` Enum's values."""
    assert BACKPROPS == tuple(b.value for b in Backprop)

"""Stability of the reversible networks: the structured fields' spectra, the linearised midpoint step, the guards.

The theory (msnet/core/residual.py, :class:`ConvAntisym`): the two-step midpoint rule is stable on a
field whose Jacobian J has purely imaginary eigenvalues i omega, for h |omega| < 1, and on no step
size where J has real eigenvalues (the parasitic root grows like exp(|lambda| t)). The tests walk the
registry: every residual that declares a structured spectrum is checked against it.
"""

from __future__ import annotations

import math

import pytest
import torch

from msnet.core import INTEGRATORS, RESIDUALS, ModelSpec, StageSpec, build_model
from msnet.core.network import ODEBlock
from msnet.core.residual import Spectrum, antisym_stencil, conv_norm
from msnet.core.stability import INIT_STEP_RATIO, scheme_note, stable_fields
from msnet.training.setup import stability_notes

from .test_integrators import conv_matrix

pytestmark = pytest.mark.usefixtures("one_thread")

STRUCTURED = [r for r in RESIDUALS.names() if RESIDUALS.get(r).spectrum is not Spectrum.general]
STEP_LIMITED = [n for n in INTEGRATORS.names() if INTEGRATORS.get(n).step_limit is not None]
MIDPOINT_FIELDS = stable_fields(INTEGRATORS.get("midpoint"))


def random_theta(residual, seed: int, scale: float = 1.0):
    """One step's parameters: stencils N(0, (scale / sqrt(fan_in))^2), biases N(0, 0.1^2), float64."""
    g = torch.Generator().manual_seed(seed)
    theta = {}
    for k, shape in residual.shapes().items():
        if len(shape) > 1:
            theta[k] = scale * torch.randn(*shape, generator=g, dtype=torch.float64) / math.sqrt(9 * shape[1])
        else:
            theta[k] = 0.1 * torch.randn(*shape, generator=g, dtype=torch.float64)
    return theta


def jacobian(name: str, activation: str, c: int = 4, s: int = 5, seed: int = 0, scale: float = 1.0):
    """Dense J = dF/dy ``(c s^2, c s^2)`` of residual ``name`` at a random state, random weights; and the residual, theta."""
    residual = RESIDUALS.get(name)(c, activation)
    theta = random_theta(residual, seed, scale)
    y = torch.randn(1, c, s, s, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda v: residual(v.reshape(y.shape), theta).flatten(), y.flatten())
    return J, residual, theta


def midpoint_companion(J: torch.Tensor, h: float) -> torch.Tensor:
    """The linearised midpoint step (e_j, e_{j-1}) -> (e_{j+1}, e_j) = (e_{j-1} + 2h J e_j, e_j) as a matrix."""
    m = J.shape[0]
    eye = torch.eye(m, dtype=J.dtype)
    return torch.cat([torch.cat([2 * h * J, eye], 1), torch.cat([eye, torch.zeros_like(eye)], 1)], 0)


def test_antisym_stencil_is_an_antisymmetric_operator():
    """K - K^T with K^T the transposed convolution (zero boundary): the dense matrix A has A^T = -A exactly."""
    K = torch.randn(3, 3, 3, 3, dtype=torch.float64)
    A = conv_matrix(antisym_stencil(K), 3, 5)
    torch.testing.assert_close(A.T, -A, rtol=0, atol=1e-14)
    assert A.abs().max() > 0.1


def test_conv_norm_is_the_operator_norm():
    """Power iteration over the grid approaches the dense matrix's 2-norm from below, a batch of stencils at once."""
    K = torch.randn(3, 2, 4, 3, 3, dtype=torch.float64)
    dense = torch.stack([torch.linalg.matrix_norm(conv_matrix(k, 4, 6), 2) for k in K])
    for iters, rel in ((30, 0.95), (300, 0.999)):
        estimate = conv_norm(K, size=6, iters=iters)
        assert (estimate <= dense * (1 + 1e-12)).all() and (estimate >= rel * dense).all(), (iters, estimate, dense)
    state = torch.get_rng_state()
    conv_norm(K)
    assert torch.equal(torch.get_rng_state(), state)  # a fixed start vector: the global RNG is untouched


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("name", STRUCTURED)
def test_structured_fields_have_their_spectrum_and_bound(name, activation):
    """Every residual declaring a spectrum has it at random states and weights, within its declared bound.

    Tolerance 1e-6 rho: with relu, D's zeros can leave J defective (Jordan blocks), whose eigenvalues
    LAPACK returns only to about sqrt(eps) (1.6e-9 for the Hamiltonian field); a real part of the
    plain field is 0.2 rho or more (test_the_plain_field_has_real_parts)."""
    for seed in range(3):
        J, residual, theta = jacobian(name, activation, seed=seed)
        ev = torch.linalg.eigvals(J)
        rho = ev.abs().max().item()
        if residual.spectrum is Spectrum.imaginary:
            assert ev.real.abs().max().item() <= 1e-6 * rho, (name, seed)
        else:  # nonpositive: real and <= 0
            assert ev.imag.abs().max().item() <= 1e-6 * rho and ev.real.max().item() <= 1e-6 * rho, (name, seed)
        bound = residual.spectral_bounds({k: v.unsqueeze(0) for k, v in theta.items()}).item()
        assert rho <= 1.05 * bound, (name, rho, bound)  # conv_norm estimates from below, within a few per cent


def test_the_plain_field_has_real_parts():
    """sigma(K y + b): eigenvalues well off the imaginary axis, so the midpoint rule has no stable step size."""
    for seed in range(3):
        ev = torch.linalg.eigvals(jacobian("conv_act", "tanh", seed=seed)[0])
        assert ev.real.abs().max().item() > 0.2 * ev.abs().max().item()


def amplification(J: torch.Tensor, h: float, T: float) -> float:
    """||M^n||_2 for n = T/h linearised midpoint steps: the largest growth of any perturbation (e_1, e_0)."""
    return torch.linalg.matrix_norm(torch.linalg.matrix_power(midpoint_companion(J, h), round(T / h)), 2).item()


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("name", MIDPOINT_FIELDS)
def test_linearised_midpoint_step_is_bounded_where_the_plain_one_grows(name, activation):
    """Frozen linearisation, h = 1/8, random weights (h rho(J) <= 0.5): every root of the step on the unit circle
    (amplification 1 per step), and over T = 16 and 64 (128 and 512 steps) the growth of any perturbation stays
    bounded (tanh: D > 0, J similar to an antisymmetric matrix) or grows at most linearly in T (relu: D's zeros
    leave Jordan blocks). The plain conv_act field, same h, amplifies by more than 1e6 over T = 64."""
    h = 0.125
    for seed in range(2):
        J, _, _ = jacobian(name, activation, seed=seed)
        assert h * torch.linalg.eigvals(J).abs().max().item() <= 0.5
        roots = torch.linalg.eigvals(midpoint_companion(J, h)).abs()
        assert roots.max().item() <= 1 + 1e-6
        a16, a64 = amplification(J, h, 16.0), amplification(J, h, 64.0)
        if activation == "tanh":
            assert a16 <= 20 and a64 <= 20, (a16, a64)
        else:
            assert a64 <= 200 and a64 <= 4 * a16, (a16, a64)
        plain = jacobian("conv_act", activation, seed=seed)[0]
        assert torch.linalg.eigvals(midpoint_companion(plain, h)).abs().max().item() > 1 + h / 20
        assert amplification(plain, h, 64.0) > 1e6


def test_the_midpoint_step_size_condition_is_sharp():
    """conv_antisym: h rho(J) = 0.9 keeps the step's roots on the unit circle, h rho(J) = 1.5 does not."""
    J = jacobian("conv_antisym", "tanh")[0]
    rho = torch.linalg.eigvals(J).abs().max().item()
    assert torch.linalg.eigvals(midpoint_companion(J, 0.9 / rho)).abs().max().item() <= 1 + 1e-6
    assert torch.linalg.eigvals(midpoint_companion(J, 1.5 / rho)).abs().max().item() > 1.5


def autonomous_block(residual: str, n: int, T: float, c: int, seed: int) -> ODEBlock:
    """The midpoint on one random field for all steps: stencils N(0, 1/fan_in), zero biases, tanh."""
    torch.manual_seed(seed)
    block = ODEBlock(RESIDUALS.get(residual)(c, "tanh"), INTEGRATORS.get("midpoint")(), n, T).double()
    with torch.no_grad():
        for p in block.params.values():
            one = torch.randn(p.shape[1:], dtype=p.dtype) / math.sqrt(9 * p.shape[2]) if p.dim() > 2 else 0.0 * p[0]
            p.copy_(one.expand_as(p))
    return block


@pytest.mark.parametrize("seed", [0, 1])
def test_midpoint_network_near_zero_stays_bounded_where_the_plain_one_grows(seed):
    """The nonlinear network near y = 0 (||y0|| small, so J decides), h = 1/4, T = 8, 32, 128:
    ||y(T)|| / ||y(0)|| stays in [1/4, 4] with conv_antisym; the plain conv_act midpoint passes 100."""
    h, c = 0.25, 8
    y0 = 1e-3 * torch.randn(2, c, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for T in (8.0, 32.0, 128.0):
            ratio = (autonomous_block("conv_antisym", int(T / h), T, c, seed)(y0).norm() / y0.norm()).item()
            assert 0.25 <= ratio <= 4.0, (T, ratio)
        plain = (autonomous_block("conv_act", int(128 / h), 128.0, c, seed)(y0).norm() / y0.norm()).item()
    assert plain > 100.0, plain


@pytest.mark.parametrize("name", STEP_LIMITED)
def test_new_blocks_start_at_half_their_step_limit(name):
    """At h = 1 (the presets') every stable field starts at most 1/2 along its limit; at h = 1/8 nothing changes,
    and the scaling leaves the global RNG where the residual's own initialisation left it."""
    integrator = INTEGRATORS.get(name)
    for residual in stable_fields(integrator):
        torch.manual_seed(0)
        block = ODEBlock(RESIDUALS.get(residual)(8, "relu"), integrator(), 6, 6.0)
        after_block = torch.rand(1)
        assert block.step_ratios().max().item() <= INIT_STEP_RATIO * (1 + 1e-6)
        torch.manual_seed(0)
        plain = RESIDUALS.get(residual)(8, "relu")
        params = {k: torch.empty(6, *s) for k, s in plain.shapes().items()}
        plain.init_(params)
        assert torch.equal(torch.rand(1), after_block)
        torch.manual_seed(0)
        fine = ODEBlock(RESIDUALS.get(residual)(8, "relu"), integrator(), 6, 6.0 / 8)
        assert fine.step_ratios().max().item() < INIT_STEP_RATIO
        for k, p in params.items():
            assert torch.equal(fine.params[k].detach(), p), (residual, k)


def test_step_ratios_follow_the_kernels():
    """A network's step ratios per stage: 1/2 at the start (h = 1), tripled with its kernels; None for a ResNet."""
    spec = ModelSpec(1, 3, (8, 8), [StageSpec(4, 2, 2.0), StageSpec(4, 2, 2.0)], residual="conv_antisym",
                     activation="tanh", integrator="midpoint", classifier="gap")
    model = build_model(spec)
    assert model.step_ratios() == pytest.approx([INIT_STEP_RATIO] * 2, rel=1e-6)
    with torch.no_grad():
        model.blocks[1].params["K"].mul_(3.0)
    assert model.step_ratios()[1] == pytest.approx(3 * INIT_STEP_RATIO, rel=1e-6)
    assert build_model(ModelSpec(1, 3, (8, 8))).step_ratios() == [None]


def test_unstable_pairings_get_a_note_not_an_error():
    """The plain midpoint stays available (for comparison), with one line naming the stable fields."""
    note = scheme_note(INTEGRATORS.get("midpoint"), RESIDUALS.get("conv_act"))
    assert "model.residual=conv_antisym" in note and "\n" not in note
    assert scheme_note(INTEGRATORS.get("leapfrog"), RESIDUALS.get("conv_antisym")) is not None
    assert scheme_note(INTEGRATORS.get("euler"), RESIDUALS.get("conv_act")) is None
    build_model(ModelSpec(1, 3, (8, 8), integrator="midpoint"))  # conv_act: builds, no error


def test_a_run_notes_an_unstable_pairing_from_its_config(compose_cfg):
    """Before data is loaded, the config alone: the presets get no note, the plain midpoint one line."""
    for preset in ("midpoint", "leapfrog", "hamiltonian", "resnet"):
        assert stability_notes(compose_cfg("train", [f"model={preset}"]).model) == []
    (line,) = stability_notes(compose_cfg("train", ["model=midpoint", "model.residual=conv_act"]).model)
    assert "model.residual=conv_antisym" in line


def test_a_long_leapfrog_or_hamiltonian_stage_is_told_its_bound(compose_cfg):
    """T = 16 (h = 1) leapfrog/Hamiltonian stages did not learn unbounded: the run names the bound for its N."""
    def notes(*overrides):
        return stability_notes(compose_cfg("train", list(overrides)).model)

    (line,) = notes("model=leapfrog", "model.layers=16", "model.T=16")
    assert "model.step_bound=0.0625" in line and "\n" not in line
    (line,) = notes("model=hamiltonian", "model.layers=16", "model.T=16")
    assert "model.step_bound=0.188" in line
    (line,) = notes("model=leapfrog", "model.backprop=reversible", "model.layers=64", "model.T=64")
    assert "model.step_bound=0.0039" in line
    assert notes("model=leapfrog", "model.layers=16", "model.T=16", "model.step_bound=0.0625") == []
    assert notes("model=leapfrog", "model.layers=16", "model.T=6") == []  # a short stage, finer steps
    assert notes("model=midpoint", "model.layers=16", "model.T=16") == []  # learned unbounded (conv_antisym)


def _states(model, x):
    """Every stage's states y_0 .. y_N of one forward pass, by hand: the step hook's, then the block's output."""
    seen = {s: [] for s in range(len(model.blocks))}
    handles = [b.register_forward_hook(lambda _m, _i, y, s=s: seen[s].append(y)) for s, b in enumerate(model.blocks)]
    with model.step_hook(lambda s: lambda j, y: seen[s].append(y)):
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("integrator,residual", [("euler", "conv_act"), ("rk2", "conv_act"), ("midpoint", "conv_antisym"),
                                                 ("leapfrog", "conv_sym"), ("hamiltonian", "hamiltonian")])
def test_state_norms_see_every_state_of_every_integrator(integrator, residual):
    """ODEResNet.state_norms: per stage, the largest RMS ||y||/sqrt(CHW) over images and states y_0 .. y_N (and a
    Runge-Kutta step's stage inputs), the same
    for backprop=store and reversible (whose forward runs inside an autograd Function); the hooks are gone after."""
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    peaks = {}
    for backprop in ("store", "reversible") if INTEGRATORS.get(integrator).reversible else ("store",):
        torch.manual_seed(0)
        spec = ModelSpec(1, 3, (8, 8), [StageSpec(4, 3, 3.0), StageSpec(8, 2, 2.0)], residual=residual,
                         activation="tanh", integrator=integrator, classifier="gap", connective="pad", backprop=backprop)
        model = build_model(spec)
        with torch.no_grad():
            model.opening.weight.mul_(5.0)  # states well away from 0, so that steps change their norms
        with model.state_norms() as got:
            F_out = model(x)
            assert got == [0.0, 0.0]  # filled on the way out
        F_out.sum().backward()  # the reversible backward does not fire the probe (nothing is left to fire)
        states = _states(model, x)
        per_step = 1 if INTEGRATORS.get(integrator).reversible else INTEGRATORS.get(integrator).stages
        assert [len(states[0]), len(states[1])] == [3 * per_step + 1, 2 * per_step + 1]  # every evaluation, the output
        want = [max((y.flatten(1).norm(dim=1) / y[0].numel() ** 0.5).max().item() for y in states[s]) for s in (0, 1)]
        assert got == pytest.approx(want, rel=1e-6)
        assert len({round(v, 6) for y in states[0] for v in [y.norm().item()]}) > 1  # the states do differ
        assert all(b.probe is None and not b._forward_hooks for b in model.blocks)
        peaks[backprop] = got
    if "reversible" in peaks:
        assert peaks["reversible"] == pytest.approx(peaks["store"], rel=1e-6)


def _leapfrog_run(compose_cfg, overrides):
    """A tiny leapfrog trained by the level loop as msnet train trains it; returns its model."""
    from msnet.data import prepare_data
    from msnet.training.fit import run_levels
    from msnet.training.schedule import build_schedule
    from msnet.training.setup import check_config, model_spec
    from msnet.training.state import RunState

    cfg = compose_cfg("train", ["model=leapfrog", "model.widths=[4,4]", "model.stages=2", "model.layers=4", "model.T=4",
                                "dataset=synthetic", "dataset.n_train=256", "dataset.n_test=64", "dataset.val_size=64",
                                "dataset.image_size=8", "trainer.epochs=2", "trainer.batch_size=32",
                                "trainer.progress=false", "device=cpu", "optimizer.scheduler=constant", *overrides])
    check_config(cfg)
    data = prepare_data(cfg.dataset, torch.device("cpu"))
    spec = model_spec(cfg.model, data)
    schedule = build_schedule(cfg, data.image_size, len(spec.stages))
    state = RunState.start(cfg, spec, schedule, torch.device("cpu"), torch.float32)
    for _ in run_levels(state, schedule, data, cfg, summaries=False):
        pass
    return state.model


def test_step_bound_holds_after_training_with_a_large_learning_rate(compose_cfg):
    """model.step_bound=0.9: after 16 Adam steps of lr 0.1 (50 times the default), every leapfrog step keeps
    h^2 ||K_j||^2 / 4 <= 0.9 by a cold 300-iteration norm (the projection's warm 2-iteration estimate is not
    trusted); without the bound the same run ends beyond the stability limit (ratio > 1)."""
    bounded = _leapfrog_run(compose_cfg, ["model.step_bound=0.9", "optimizer.lr=0.1"])
    free = _leapfrog_run(compose_cfg, ["optimizer.lr=0.1"])
    for model, check in ((bounded, lambda r: r <= 0.9 * 1.01), (free, lambda r: r > 1.0)):
        for b in model.blocks:
            rho = conv_norm(b.params["K"], iters=300) ** 2
            ratio = (b.h**2 * rho / 4.0).max().item()
            assert check(ratio), (model.spec.step_bound, ratio)
    assert bounded.spec.step_bound == 0.9 and free.spec.step_bound is None


def test_step_bound_is_checked_before_data(compose_cfg):
    """Out of (0, 1], or on a network with no step-size condition: one line naming the fix."""
    from msnet import MsnetError
    from msnet.training.setup import check_config

    check_config(compose_cfg("train", ["model=leapfrog", "model.step_bound=0.5"]))
    with pytest.raises(MsnetError, match=r"model.step_bound must be in \(0, 1\]"):
        check_config(compose_cfg("train", ["model=leapfrog", "model.step_bound=1.5"]))
    with pytest.raises(MsnetError, match="set model.step_bound=null"):
        check_config(compose_cfg("train", ["model=resnet", "model.step_bound=0.5"]))


def test_warm_norm_estimates_track_the_cold_ones():
    """conv_norm with memory: after a cold start, 2 iterations from the last vector per small change stay within
    1 % of a cold 30-iteration estimate (and cost 2 iterations: the memory's vector has the grid's shape)."""
    g = torch.Generator().manual_seed(0)
    K = torch.randn(3, 6, 6, 3, 3, generator=g, dtype=torch.float64) / 7
    memory = {}
    conv_norm(K, memory=memory)
    assert memory["K"].shape == (1, 3 * 6, 16, 16)
    for _ in range(10):
        K = K + 0.01 * torch.randn(K.shape, generator=g, dtype=torch.float64) / 7
        warm, cold = conv_norm(K, memory=memory), conv_norm(K)
        assert ((warm - cold).abs() <= 0.01 * cold).all(), (warm, cold)

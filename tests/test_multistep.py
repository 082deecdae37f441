"""The LM-architecture (Lu et al. 2018): Euler at k = 0, order on a linear ODE, stochastic depth, gradcheck, a real run."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.func import functional_call

from msnet import MsnetError
from msnet.core import INTEGRATORS, RESIDUALS, LinearMultistep, ModelSpec, StageSpec, StochasticDepth, build_model
from msnet.core.multistep import lmm_order
from msnet.core.network import ODEBlock
from msnet.core.residual import ConvAct
from msnet.runs import load_checkpoint
from msnet.training import train
from msnet.training.setup import check_config

from .conftest import loglog_slope
from .test_integrators import conv_matrix


def block(name: str, residual: str, n_steps: int, T: float = 1.0, channels: int = 2, activation: str = "tanh") -> ODEBlock:
    """A float64 ODE block with freshly initialised parameters."""
    return ODEBlock(RESIDUALS.get(residual)(channels, activation), INTEGRATORS.get(name)(), n_steps, T).double()


# ---------------------------------------------------------------- facts and coefficients

def test_registry_facts():
    cls = INTEGRATORS.get("lm")
    assert cls is LinearMultistep
    assert cls.facts() == {
        "name": "lm", "order": 1, "reversible": False, "history": 2, "stages": 1, "per_step_params": True,
    }
    assert cls().shapes() == {"k": ()}


@pytest.mark.parametrize(
    "k,order",
    [(0.0, 1), (-0.5, 1), (0.5, 1), (0.75, 1), (1.0, 2), (-1.0, 0), (1.5, 0), (-1.25, 0)],
)
def test_order_from_the_order_conditions(k, order):
    """C_2 = (1 - k)/2 vanishes only at k = 1 (leapfrog); k = -1 and |k| > 1 do not converge."""
    assert LinearMultistep.order_at(k) == order


def test_lmm_order_knows_textbook_methods():
    assert lmm_order((-1.0, 1.0), (1.0, 0.0)) == 1  # forward Euler
    assert lmm_order((-1.0, 0.0, 1.0), (0.0, 2.0, 0.0)) == 2  # explicit midpoint (leapfrog)
    assert lmm_order((0.0, -1.0, 1.0), (-0.5, 1.5, 0.0)) == 2  # Adams-Bashforth 2
    assert lmm_order((-1.0, 1.0), (0.5, 0.5)) == 2  # trapezoidal rule
    assert lmm_order((-1.0, 2.0), (1.0, 0.0)) == 0  # rho(1) != 0


def test_k_is_initialised_in_the_papers_interval():
    torch.manual_seed(0)
    k = block("lm", "conv_act", 500).params["k"]
    assert k.shape == (500,)
    assert -0.1 <= k.min().item() and k.max().item() <= 0.0 and k.std().item() > 0.02


# ---------------------------------------------------------------- (a) k = 0 is the ResNet

@pytest.mark.parametrize("residual", RESIDUALS.names())
def test_k_zero_is_forward_euler_exactly(residual):
    """Every k_n = 0: the LM block equals the forward-Euler block with the same F, bit for bit (float64)."""
    torch.manual_seed(0)
    lm = block("lm", residual, 5, T=2.0, channels=4)
    euler = block("euler", residual, 5, T=2.0, channels=4)
    with torch.no_grad():
        lm.params["k"].zero_()
        for name, p in euler.params.items():
            p.copy_(lm.params[name])
    y = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(lm(y), euler(y), rtol=0, atol=0)


def test_lm_step_by_step():
    """u_1 = u_0 + h F(u_0)/(1 + k_0), then u_{n+1} = (1 - k_n) u_n + k_n u_{n-1} + h F(u_n)."""
    torch.manual_seed(1)
    b = block("lm", "conv_act", 4, T=2.0, channels=3)
    with torch.no_grad():
        b.params["k"].copy_(torch.tensor([0.3, -0.2, 0.4, 0.9]))
    P = b.params

    def F(j, u):
        return torch.tanh(torch.nn.functional.conv2d(u, P["K"][j], P["b"][j], padding=1))

    u0 = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    h, k = 0.5, P["k"]
    u = [u0, u0 + h * F(0, u0) / (1 + k[0])]
    for n in range(1, 4):
        u.append((1 - k[n]) * u[n] + k[n] * u[n - 1] + h * F(n, u[n]))
    torch.testing.assert_close(b(u0), u[-1], rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------- (b) order on a linear ODE

@pytest.mark.parametrize("k", [0.0, -0.5, 0.5, 1.0])
def test_convergence_order_on_linear_ode(k):
    """dy/dt = A y / (1 + k), A a fixed 3x3 convolution, k frozen: y(T) = expm(T A / (1 + k)) y0.

    The fitted slope of log error against log h must be the order the order conditions
    give (:meth:`LinearMultistep.order_at`): 1, except 2 at k = 1, within 0.2.
    """
    torch.manual_seed(0)
    c, s, T = 2, 5, 1.0
    K = torch.randn(c, c, 3, 3, dtype=torch.float64) * 0.4
    y0 = torch.randn(1, c, s, s, dtype=torch.float64)
    A = conv_matrix(K, c, s)
    exact = (torch.linalg.matrix_exp(T * A / (1 + k)) @ y0.flatten()).reshape(y0.shape)
    steps = [64, 128, 256, 512]
    errors = []
    for n in steps:
        b = ODEBlock(ConvAct(c, "identity"), LinearMultistep(), n, T).double()
        with torch.no_grad():
            b.params["K"].copy_(K.expand(n, *K.shape))
            b.params["b"].zero_()
            b.params["k"].fill_(k)
        b.params["k"].requires_grad_(False)
        with torch.no_grad():
            errors.append(((b(y0) - exact).norm() / exact.norm()).item())
    fitted = loglog_slope([T / n for n in steps], errors)
    assert abs(fitted - LinearMultistep.order_at(k)) < 0.2, (k, fitted, errors)
    assert errors[-1] < errors[0]


# ---------------------------------------------------------------- (c) stochastic depth

def test_survival_decays_linearly_over_the_whole_network():
    """p_l = 1 - (l/L)(1 - p_last), l = 1..L counted across stages (Huang et al. 2016, eq. 4)."""
    spec = ModelSpec(1, 3, (8, 8), [StageSpec(2, 3, 1.0), StageSpec(4, 5, 1.0)], integrator="lm",
                     stochastic_depth=StochasticDepth(0.5))
    model = build_model(spec)
    p = model.survival_probabilities()
    assert [t.shape[0] for t in p] == [3, 5]
    flat = torch.cat(p)
    torch.testing.assert_close(flat, 1 - torch.arange(1, 9, dtype=torch.float64) / 8 * 0.5)
    assert flat[-1].item() == 0.5
    assert build_model(ModelSpec(1, 3, (8, 8))).survival_probabilities() is None


class Recorder(ConvAct):
    """ConvAct that records which steps it evaluated (step j's bias b_j[0] holds j)."""

    def __init__(self, channels: int, activation: str = "identity"):
        super().__init__(channels, activation)
        self.calls: list[int] = []

    def __call__(self, y, theta):
        self.calls.append(int(theta["b"][0].item()))
        return super().__call__(y, theta)


@pytest.mark.parametrize("name", ["lm", "euler"])
def test_drop_rate_matches_survival(name):
    """Over M = 2000 training passes, step j is evaluated in a fraction p_j of them.

    Tolerance 4.5 binomial standard deviations, sqrt(p (1 - p) / M) <= 0.0112: a false
    failure has probability below 1e-5 per step (and the run is seeded).
    """
    torch.manual_seed(0)
    survival = 1 - torch.arange(1, 7, dtype=torch.float64) / 6 * 0.5
    rec = Recorder(1)
    b = ODEBlock(rec, INTEGRATORS.get(name)(), 6, 1.0).double().train()
    with torch.no_grad():
        b.params["b"].copy_(torch.arange(6, dtype=torch.float64)[:, None])
    y = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    M = 2000
    with torch.no_grad():
        for _ in range(M):
            b(y, survival)
    counts = torch.bincount(torch.tensor(rec.calls), minlength=6).double()
    rate = counts / M
    tol = 4.5 * torch.sqrt(survival * (1 - survival) / M)
    assert torch.all((rate - survival).abs() <= tol), (rate, survival)


def test_eval_is_deterministic_and_scales_by_survival():
    """model.eval(): two passes agree exactly, and equal the block with h F scaled by p_j."""
    torch.manual_seed(0)
    spec = ModelSpec(1, 3, (8, 8), [StageSpec(2, 3, 1.0), StageSpec(4, 2, 1.0)], integrator="lm",
                     residual="preact_basic", activation="relu", classifier="gap",
                     stochastic_depth=StochasticDepth(0.3))
    model = build_model(spec).double().eval()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)
        p = model.survival_probabilities()
        y = model.activation(model.opening(x))
        for s, blk in enumerate(model.blocks):
            if s > 0:
                y = model.connectives[s - 1](y)
            y = blk(y, p[s])
        torch.testing.assert_close(model.classifier(y), out, rtol=0, atol=0)
        # training mode is random: two passes differ
        model.train()
        outs = [model(x) for _ in range(6)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def linear_lm_block(n: int, seed: int = 0) -> ODEBlock:
    """An LM block with identity activation (a linear ODE), fixed random k in [-0.5, 0.5]."""
    torch.manual_seed(seed)
    b = block("lm", "conv_act", n, T=1.0, channels=2, activation="identity")
    with torch.no_grad():
        b.params["K"].mul_(3.0)
        b.params["b"].normal_()
        b.params["k"].uniform_(-0.5, 0.5)
    return b


def test_eval_output_is_the_exact_mean_of_training_outputs_on_a_linear_block():
    """For linear F the gates enter linearly and independently, so E[train output] = eval output.

    Checked exactly by summing over all 2^N gate patterns with their probabilities (to round-off).
    """
    n = 4
    b = linear_lm_block(n)
    survival = torch.tensor([0.9, 0.7, 0.55, 0.4], dtype=torch.float64)
    y = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        b.eval()
        mean_eval = b(y, survival)
        expectation = torch.zeros_like(mean_eval)
        for pattern in itertools.product([0.0, 1.0], repeat=n):
            g = torch.tensor(pattern, dtype=torch.float64)
            prob = torch.prod(torch.where(g == 1, survival, 1 - survival))
            expectation += prob * b(y, g)  # eval with 0/1 "probabilities" runs that gate pattern
    torch.testing.assert_close(expectation, mean_eval, rtol=1e-12, atol=1e-12)


def test_monte_carlo_mean_of_training_outputs_matches_eval():
    """M = 1500 training passes: |mean - eval| <= 5 standard errors in every entry (CLT, seeded)."""
    n, M = 4, 1500
    b = linear_lm_block(n, seed=3)
    survival = torch.tensor([0.9, 0.7, 0.55, 0.4], dtype=torch.float64)
    y = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    torch.manual_seed(1)
    with torch.no_grad():
        b.train()
        samples = torch.stack([b(y, survival) for _ in range(M)])
        b.eval()
        target = b(y, survival)
    mean, stderr = samples.mean(0), samples.std(0) / math.sqrt(M)
    assert torch.all((mean - target).abs() <= 5 * stderr + 1e-12), ((mean - target).abs() / stderr).max()


@pytest.mark.parametrize("p_last", [0.0, -0.2, 1.5, float("nan")])
def test_bad_p_last_is_one_line(compose_cfg, p_last):
    cfg = compose_cfg("train", ["model=lm_resnet", f"model.stochastic_depth.p_last={p_last}"])
    with pytest.raises(MsnetError, match="model.stochastic_depth.p_last must be in") as err:
        check_config(cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(MsnetError, match="p_last"):
        ModelSpec(1, 3, (8, 8), stochastic_depth=StochasticDepth(p_last)).validate()


def test_old_specs_without_stochastic_depth_still_load():
    d = ModelSpec(1, 3, (8, 8), integrator="lm", stochastic_depth=StochasticDepth(0.5)).to_dict()
    assert d["stochastic_depth"] == {"p_last": 0.5}
    assert ModelSpec.from_dict(d).stochastic_depth.p_last == 0.5
    del d["stochastic_depth"]
    assert ModelSpec.from_dict(d).stochastic_depth == StochasticDepth(1.0)


# ---------------------------------------------------------------- (d) gradcheck

GRADCHECK_CASES = [(r, "plain") for r in RESIDUALS.names()] + [("conv_act", "sd_eval"), ("conv_act", "sd_train")]


@pytest.mark.parametrize("residual,mode", GRADCHECK_CASES)
def test_gradcheck_including_k(residual, mode):
    """float64 gradcheck w.r.t. the input, every residual parameter and every k_n.

    Every residual without stochastic depth; with it (the gates do not depend on F) in
    eval mode, and in training mode with the gate pattern fixed by reseeding inside
    the function (seed 4 keeps steps 0 and 2 and drops 1 and 3).
    """
    torch.manual_seed(0)
    b = block("lm", residual, 4, T=1.0, channels=2)
    if mode == "sd_train":
        b.train()
    else:
        b.eval()
    survival = None if mode == "plain" else torch.tensor([0.9, 0.6, 0.5, 0.4], dtype=torch.float64)
    names = list(b.params.keys())
    y = torch.randn(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    inputs = (y, *[b.params[n].detach().clone().requires_grad_(True) for n in names])

    def g(y, *ps):
        with torch.random.fork_rng():
            torch.manual_seed(4)
            return functional_call(b, {f"params.{n}": p for n, p in zip(names, ps)}, (y, survival))

    if mode == "sd_train":
        with torch.random.fork_rng():
            torch.manual_seed(4)
            gates = torch.bernoulli(survival)
        assert 0 < gates.sum() < 4, gates
    assert "k" in names
    assert torch.autograd.gradcheck(g, inputs, eps=1e-6, atol=1e-6)


def test_gradient_reaches_every_k():
    torch.manual_seed(0)
    b = block("lm", "preact_basic", 5, channels=3)
    b(torch.randn(2, 3, 4, 4, dtype=torch.float64)).square().sum().backward()
    assert torch.all(b.params["k"].grad != 0)


# ---------------------------------------------------------------- (e) a real run

@pytest.mark.parametrize("p_last", [1.0, 0.5])
def test_lm_resnet_trains_on_synthetic_data(tiny_cfg, tmp_path, p_last):
    """``model=lm_resnet`` learns the synthetic classes, with and without stochastic depth.

    The classes are spatial templates that global average pooling mostly averages
    away (GAP reaches about 45 % here), so the run uses the full-field classifier.
    """
    cfg = tiny_cfg(["model=lm_resnet", "model.channels=4", "model.layers=2", "model.classifier=full_field",
                    "trainer.epochs=3", "optimizer.lr=5e-3", f"model.stochastic_depth.p_last={p_last}"])
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed"
    assert summary["final_test_acc"] > 0.5, summary  # 4 classes: chance is 0.25
    ck = load_checkpoint(tmp_path / "run")
    assert ck["model_spec"]["integrator"] == "lm"
    assert ck["model_spec"]["stochastic_depth"] == {"p_last": p_last}
    assert ck["model"]["blocks.0.params.k"].shape == (2,)

"""optimizer=bcd (Haber et al. 2018's block-coordinate descent): the mathematics, then the plumbing.

* the matrix-free Gauss–Newton product equals J^T H J v from explicit Jacobians (float64),
  for both ways of forming J v and for integrators of every kind;
* Newton–CG on the classifier alone converges quadratically and reaches L-BFGS's optimum;
* BCD lowers the objective at every iteration, learns real Fashion-MNIST, resumes exactly,
  and refuses bad settings with one line.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from msnet import MsnetError
from msnet.core import ModelSpec, StageSpec, build_model
from msnet.runs import read_metrics
from msnet.methods import build_optimizer
from msnet.training import train
from msnet.config import BCDConfig
from msnet.methods.bcd import BCD, bcd_settings, gn_subsample, stored_states
from msnet.methods.newton import GaussNewton, QuadraticHessian, conjugate_gradient, cross_entropy_objective, newton_cg
from msnet.methods.regularizers import build_regularizer
from msnet.methods import selected_rule

from .conftest import needs_fashion


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(integrator="euler", residual="conv_act", backprop="store", classes=3, channels=2, layers=3):
    torch.manual_seed(0)
    spec = ModelSpec(in_channels=1, num_classes=classes, image_size=(4, 4), stages=[StageSpec(channels, layers, 1.0)],
                     integrator=integrator, residual=residual, backprop=backprop)
    return build_model(spec).double()


def propagation(model):
    ids = {id(p) for p in model.classifier.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in ids]


def flat(vs):
    return torch.cat([v.reshape(-1) for v in vs])


def unflat(vec, like):
    out, i = [], 0
    for p in like:
        out.append(vec[i:i + p.numel()].view_as(p))
        i += p.numel()
    return out


class _Penalty(nn.Module):
    """The regulariser closure as a module forward, so functional_call can feed it other parameters."""

    def __init__(self, model, penalty):
        super().__init__()
        self.model, self.penalty = model, penalty

    def forward(self):
        return self.penalty()


ARCHS = [("euler", "conv_act", "store"), ("rk4", "conv_act", "store"), ("lm", "conv_act", "store"),
         ("hamiltonian", "hamiltonian", "reversible"), ("leapfrog", "conv_sym", "reversible")]


@pytest.mark.parametrize("mode", GaussNewton.MODES)
@pytest.mark.parametrize("arch", ARCHS, ids=[a[0] for a in ARCHS])
def test_gauss_newton_product_equals_explicit_jacobians(arch, mode):
    model = tiny_net(*arch)
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    prop = propagation(model)
    names, params = [n for n, _ in prop], [p for _, p in prop]
    v = [torch.randn_like(p) for p in params]
    with stored_states(model):
        gn = GaussNewton(lambda p: torch.func.functional_call(model, p, (x,)), dict(prop), mode)
        got = flat(gn(v))

        def logits(theta):
            return torch.func.functional_call(model, dict(zip(names, unflat(theta, params))), (x,))

        theta0 = flat([p.detach() for p in params])
        J = torch.autograd.functional.jacobian(logits, theta0).reshape(5 * 3, -1)  # (B K, P)
        p = torch.softmax(logits(theta0), dim=1)
    H = torch.block_diag(*[(torch.diag(pi) - torch.outer(pi, pi)) / 5 for pi in p])  # mean-CE Hessian in logits
    want = J.T @ H @ J @ flat(v)
    assert want.abs().max() > 1e-3  # not a trivial comparison
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    assert gn.products == 1


def test_regulariser_hessian_is_exact_for_both_blocks():
    model = tiny_net()
    penalty = build_regularizer(model, OmegaConf.create({"classifier_smoothness": 0.3, "stencil_smoothness": 0.7}))
    wrapper = _Penalty(model, penalty)
    ids = {id(p) for p in model.classifier.parameters()}
    classifier = [(n, p) for n, p in model.named_parameters() if id(p) in ids]
    for block in (propagation(model), classifier):
        names, params = [n for n, _ in block], [p for _, p in block]

        def R(theta):
            swapped = {"model." + n: t for n, t in zip(names, unflat(theta, params))}
            return torch.func.functional_call(wrapper, swapped, ())

        hess = torch.autograd.functional.hessian(R, flat([p.detach() for p in params]))
        v = [torch.randn_like(p) for p in params]
        got = flat(QuadraticHessian(penalty, params)(v))
        assert got.abs().max() > 1e-3
        torch.testing.assert_close(got, hess @ flat(v), rtol=1e-10, atol=1e-12)


def test_conjugate_gradient_solves_spd_system_and_tracks_Ax():
    torch.manual_seed(1)
    M = torch.randn(12, 12, dtype=torch.float64)
    A = M @ M.T + 5 * torch.eye(12, dtype=torch.float64)  # condition number ~10: round-off stays small
    b = [torch.randn(12, dtype=torch.float64)]
    res = conjugate_gradient(lambda v: [A @ v[0]], b, max_iters=40, rtol=1e-10)
    torch.testing.assert_close(res.x[0], torch.linalg.solve(A, b[0]), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(res.Ax[0], A @ res.x[0], rtol=1e-8, atol=1e-10)
    assert res.iters <= 12 and res.rel_residual <= 1e-10  # n steps in exact arithmetic
    # A truncated solve still tracks A x exactly and decreases the quadratic model.
    short = conjugate_gradient(lambda v: [A @ v[0]], b, max_iters=3)
    torch.testing.assert_close(short.Ax[0], A @ short.x[0], rtol=1e-10, atol=1e-10)
    assert float(-b[0] @ short.x[0] + 0.5 * short.x[0] @ A @ short.x[0]) < 0


def classifier_problem():
    """Fixed features of a tiny random network on random labels, the classifier with both penalties on."""
    model = tiny_net(classes=4, channels=3)
    torch.manual_seed(2)
    x = torch.randn(80, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (80,))
    with torch.no_grad():
        feats = model.features(x)
    penalty = build_regularizer(model, OmegaConf.create({"classifier_smoothness": 1e-4, "stencil_smoothness": 0.5}))
    return model, feats, y, penalty


def test_newton_cg_on_the_classifier_converges_quadratically_to_the_lbfgs_optimum():
    wd = 1e-2  # makes the regularised objective strictly convex: one optimum to compare against
    model, feats, y, penalty = classifier_problem()
    clf = model.classifier
    params = list(clf.parameters())
    start = [p.detach().clone() for p in params]

    def objective():
        return cross_entropy_objective(clf(feats), y, penalty, wd, params)

    def grad_norm():
        return float(flat(torch.autograd.grad(objective(), params)).norm())

    # The optimum by L-BFGS, run long (restarted until its gradient is tiny).
    lbfgs = torch.optim.LBFGS(params, lr=1, max_iter=1000, tolerance_grad=1e-12, tolerance_change=0,
                              history_size=50, line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        obj = objective()
        obj.backward()
        return obj

    for _ in range(5):
        lbfgs.step(closure)
    assert grad_norm() < 1e-6
    lbfgs_opt, lbfgs_value = flat([p.detach() for p in params]), float(objective().detach())
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
            p.grad = None

    iterates, grad_norms = [flat([p.detach() for p in params])], []
    for _ in range(8):
        report = newton_cg(clf, feats, y, steps=1, cg_iters=200, penalty=penalty, weight_decay=wd)
        grad_norms.append(report.grad_norms[0])
        iterates.append(flat([p.detach() for p in params]))
    newton_opt = iterates[-1]
    assert grad_norm() < 1e-12  # Newton reaches the optimum to round-off ...
    assert float(objective().detach()) == pytest.approx(lbfgs_value, rel=1e-12)  # ... the one L-BFGS finds
    torch.testing.assert_close(newton_opt, lbfgs_opt, rtol=0, atol=1e-5 * float(lbfgs_opt.norm()))
    errors = [float((it - newton_opt).norm()) for it in iterates[:-1]]
    # Above 1e-6 the round-off in e_{k+1} (~1e-15) cannot inflate the ratio; a linearly convergent
    # method (e_{k+1} = c e_k) would give c / e_k > 1e5 there.
    ratios = [e1 / e0**2 for e0, e1 in zip(errors, errors[1:]) if 1e-6 < e0 < 0.5]
    assert len(ratios) >= 2, errors
    assert max(ratios) < 5.0, (ratios, errors)  # quadratic: e_{k+1} <= C e_k^2 near the optimum
    assert all(a >= b for a, b in zip(grad_norms, grad_norms[1:]))


def test_bcd_iteration_is_monotone_and_both_blocks_move():
    """The objective J = mean CE + regulariser is recomputed here from the network's forward pass before and
    after every iteration, and after the propagation block alone (new propagation weights, old classifier):
    the values BCD reports are those, and J falls. The code's own acceptance rule cannot vouch for that: a
    classifier block solved on stale features reports a decrease the network does not have."""
    reg = OmegaConf.create({"classifier_smoothness": 1e-4, "stencil_smoothness": 1e-2})
    model = tiny_net(classes=4, channels=3).float()
    penalty = build_regularizer(model, reg)
    rule = BCD(model, BCDConfig(cg_iters=5, classifier_steps=3, hessian_subsample=0.5), penalty)
    torch.manual_seed(3)
    x, y = torch.randn(64, 1, 4, 4), torch.randint(0, 4, (64,))

    def objective(net):
        with torch.no_grad():
            return float(F.cross_entropy(net(x), y) + build_regularizer(net, reg)())

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        j0 = objective(model)
        old_classifier = copy.deepcopy(model.classifier.state_dict())
        out = rule.step(x, y)
        info = out.info
        j1 = objective(model)
        mixed = copy.deepcopy(model)
        mixed.classifier.load_state_dict(old_classifier)
        assert info["objective_before"] == pytest.approx(j0, rel=1e-5)
        assert info["objective_after_propagation"] == pytest.approx(objective(mixed), rel=1e-5)
        assert info["objective_after"] == pytest.approx(j1, rel=1e-5)
        assert j1 < j0 and objective(mixed) <= j0
        assert info["cg_iters"] == 5 and info["hessian_subsample"] == 32 and 0 < info["classifier_cg_iters"]
        # What StepOutput reports is the loss of the weights before the step.
        assert float(out.loss) == pytest.approx(info["loss_before"])
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    assert all(v > 0 for v in moved.values()), moved
    rule.end_epoch()
    stats = rule.epoch_stats()
    assert stats["bcd_iterations"] == 3 and stats["bcd_cg_iters"] == 15 and stats["bcd_step_mean"] > 0


def test_build_optimizer_refuses_bcd_in_one_line(compose_cfg):
    """bcd is an update rule (it needs the model), not a torch.optim optimiser over a parameter list."""
    cfg = compose_cfg("train", ["optimizer=bcd"])
    with pytest.raises(MsnetError, match="unknown optimizer 'bcd'; choose one of: adam, adamw, sgd") as err:
        build_optimizer(nn.Linear(2, 2).parameters(), cfg.optimizer)
    assert "\n" not in str(err.value)
    assert selected_rule(cfg) is BCD and BCD.selected_by == "optimizer"


def test_config_composes_as_typed(compose_cfg):
    cfg = compose_cfg("train", ["optimizer=bcd", "optimizer.cg_iters=4", "optimizer.hessian_subsample=100"])
    assert cfg.optimizer.name == "bcd" and cfg.optimizer.cg_iters == 4 and cfg.optimizer.classifier_steps == 5
    assert gn_subsample(bcd_settings(cfg.optimizer), 1024) == 100
    assert gn_subsample(bcd_settings(cfg.optimizer), 50) == 50
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_cfg("train", ["optimizer=bcd", "optimizer.cg_iters=many"])


@pytest.mark.parametrize("override, message", [
    ("optimizer.hessian_subsample=0", "optimizer.hessian_subsample must be"),
    ("optimizer.armijo_c1=1.5", "optimizer.armijo_c1 must be in"),
    ("optimizer.backtrack=1", "optimizer.backtrack must be in"),
    ("optimizer.cg_iters=0", "optimizer.cg_iters must be >= 1"),
    ("optimizer.scheduler=cosine", "set optimizer.scheduler=constant"),
    ("trainer.grad_clip=1.0", "drop trainer.grad_clip"),
])
def test_bad_settings_fail_in_one_line(tiny_cfg, tmp_path, override, message):
    with pytest.raises(MsnetError, match=message) as err:
        train(tiny_cfg(["optimizer=bcd", override, "threads=1"]), tmp_path / "run")
    assert "\n" not in str(err.value)


def read_steps(run):
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


PLUMBING = {
    "euler": [],
    "rk2-float64": ["model.integrator=rk2", "dtype=float64"],
    "lm": ["model.integrator=lm"],
    "hamiltonian-reversible": ["model.integrator=hamiltonian", "model.residual=hamiltonian",
                               "model.backprop=reversible"],
    "midpoint-reversible": ["model.integrator=midpoint", "model.backprop=reversible"],
    "two-stages-gap-stochastic-depth": ["model.stages=2", "model.classifier=gap",
                                        "model.stochastic_depth.p_last=0.5"],
    "regularised": ["regularizer.classifier_smoothness=1e-5", "regularizer.stencil_smoothness=1e-2"],
    "depth-schedule": ["+depth=doubling", "depth.start=1", "depth.stop=2", "depth.epochs=[1]"],
    "pyramid": ["+pyramid=2level", "pyramid.epochs=[1,1]"],
}


@pytest.mark.parametrize("extra", PLUMBING.values(), ids=PLUMBING.keys())
def test_train_with_bcd_lowers_the_objective_every_iteration(tiny_cfg, tmp_path, extra):
    cfg = tiny_cfg(["optimizer=bcd", "optimizer.cg_iters=3", "optimizer.classifier_steps=2", "threads=1",
                    "trainer.batch_size=200", "trainer.epochs=2", "dataset.n_train=600"] + extra)
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed"
    steps = read_steps(tmp_path / "run")
    assert len(steps) == 2 * 2  # 400 training images (600 minus 200 for validation), batches of 200
    for s in steps:
        assert s["objective_after"] < s["objective_before"], s
    metrics = [m for m in read_metrics(tmp_path / "run") if "train_loss" in m]
    assert [m["bcd_cg_iters"] for m in metrics] == [2 * 3, 2 * 3]  # per epoch: 2 batches x cg_iters


def test_resume_equals_uninterrupted_bcd_run(tiny_cfg, tmp_path, cut_and_resume):
    overrides = ["optimizer=bcd", "optimizer.cg_iters=3", "optimizer.classifier_steps=2", "optimizer.damping=0.5",
                 "trainer.epochs=3", "threads=1"]
    full = train(tiny_cfg(overrides), tmp_path / "full")
    ckpt, resumed = cut_and_resume(overrides, 3)
    assert ckpt["bcd"]["iterations"] == 2 * 7 and "damping" in ckpt["bcd"]  # 400 images, batches of 64
    assert resumed["final_test_loss"] == pytest.approx(full["final_test_loss"], rel=1e-12)
    assert read_steps(tmp_path / "resumed") == read_steps(tmp_path / "full")[2 * 7:]


@needs_fashion
@pytest.mark.slow
def test_full_batch_bcd_learns_fashion_mnist(fashion_cfg, tmp_path):
    """The paper's setting: every iteration sees the whole (small) training set, so the loss before an
    iteration is the loss after the previous one, and it must fall every time."""
    cfg = fashion_cfg(["optimizer=bcd", "dataset.train_subset=1000", "dataset.val_size=500",
                       "dataset.test_subset=1000", "model.channels=4", "trainer.batch_size=1000",
                       "trainer.epochs=4", "threads=1"])
    summary = train(cfg, tmp_path / "run")
    steps = read_steps(tmp_path / "run")
    assert len(steps) == 4
    for prev, s in zip(steps, steps[1:]):
        assert s["loss_before"] == pytest.approx(prev["loss_after"], rel=1e-5)  # same 1000 images
    for s in steps:
        assert s["loss_after"] < s["loss_before"]
    assert steps[-1]["loss_after"] < 0.5 * steps[0]["loss_before"]
    assert summary["final_test_acc"] > 0.6  # chance is 0.10

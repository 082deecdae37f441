"""MG/OPT (trainer=mgopt): first-order coherence, the h-scaling of the coarse model, descent of the
prolonged correction, reduction to plain steps, a real Fashion-MNIST run, config errors, resume."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from msnet import MsnetError
from msnet.core import ModelSpec, StageSpec, build_model
from msnet.runs import load_checkpoint, read_metrics
from msnet.methods import FirstOrder, build_optimizer, build_update
from msnet.training import train
from msnet.config import MGOptConfig
from msnet.methods.mgopt import MGOpt, coarse_depths
from msnet.methods.regularizers import build_regularizer

from .conftest import assert_same_weights, needs_fashion, strip_times

ADAM = OmegaConf.create({"name": "adam", "lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0,
                         "scheduler": "constant"})
NO_REG = OmegaConf.create({"classifier_smoothness": 0.0, "stencil_smoothness": 0.0})


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(layers=8, stages=1, integrator="euler", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    spec = ModelSpec(1, 3, (8, 8), [StageSpec(3 + s, layers, 1.0) for s in range(stages)], integrator=integrator)
    return build_model(spec).to(dtype)


def batch(dtype=torch.float64, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def linear_P(nc: int) -> torch.Tensor:
    """Piecewise-linear prolongation nc -> 2 nc steps, written out by hand (left-end samples, held past the last)."""
    P = torch.zeros(2 * nc, nc, dtype=torch.float64)
    for j in range(nc):
        P[2 * j, j] = 1.0
        if j + 1 < nc:
            P[2 * j + 1, j] = P[2 * j + 1, j + 1] = 0.5
    P[2 * nc - 1, nc - 1] = 1.0
    return P


def grads_of(level, xb, yb):
    """grad psi of a level at its current weights, by plain autograd (not Level.gradient)."""
    psi, _, _ = level.objective(xb, yb)
    return [torch.zeros_like(p) if g is None else g
            for g, p in zip(torch.autograd.grad(psi, level.params, allow_unused=True), level.params)]


def restrict_grad(fine_level, g):
    """P^T g per stage (shared variables: g itself), with the hand-written P."""
    out = []
    for gk, st in zip(g, fine_level.stage):
        out.append(gk if st is None else torch.tensordot(linear_P(gk.shape[0] // 2).T, gk, dims=1))
    return out


@pytest.mark.parametrize("integrator", ["euler", "lm"])
def test_first_order_coherence_on_every_level(integrator):
    """grad psi_{l-1}(R x_l) = P^T grad psi_l(x_l) to float64 round-off, for l = 3 and 2 of 3 levels
    (level 2's psi already carries its own coherence term), regulariser included."""
    model = tiny_net(layers=8, stages=2, integrator=integrator)
    reg = OmegaConf.create({"classifier_smoothness": 1e-3, "stencil_smoothness": 1e-2})
    rule = MGOpt(model, MGOptConfig(levels=3), ADAM, reg, 1, build_regularizer(model, reg))
    xb, yb = batch()
    assert [lv.net.depth() for lv in rule.levels] == [[2, 2], [4, 4], [8, 8]]
    for i in (2, 1):
        fine, coarse = rule.levels[i], rule.levels[i - 1]
        g_fine = grads_of(fine, xb, yb)
        rule.prepare_coarse(i, xb, yb)
        for pc, pf, st in zip(coarse.params, fine.params, fine.stage):  # x_{l-1} = injection of x_l
            torch.testing.assert_close(pc, pf if st is None else pf[::2], rtol=0, atol=0)
        g_coarse = grads_of(coarse, xb, yb)
        want = restrict_grad(fine, g_fine)
        scale = max(float(w.abs().max()) for w in want)
        for name, a, b in zip(coarse.names, g_coarse, want):
            assert float((a - b).abs().max()) <= 1e-13 * scale, name
        # without the coherence term the coarse gradient is a different vector: the test can fail
        tau = coarse.tau
        assert max(float(t.abs().max()) for t in tau) > 1e-6 * scale


def _coherence_gap(prolongation: str, n_fine: int, trim: int) -> float:
    """||v|| / ||P^T g|| over the per-step tensors (slots ``trim`` from each end dropped) for a network
    whose parameters are constant in time, so that both levels discretise the same ODE."""
    model = tiny_net(layers=n_fine)
    with torch.no_grad():
        for p in model.blocks[0].step_parameters().values():
            p.copy_(p[:1].expand_as(p))
    rule = MGOpt(model, MGOptConfig(levels=2, prolongation=prolongation), ADAM, NO_REG, 1, None)
    xb, yb = batch(n=32)
    _, _, _, g = rule.prepare_coarse(1, xb, yb)
    tau, rg = [], []
    for t, gk, st in zip(rule.levels[0].tau, g, rule.levels[1].stage):
        if st is not None:
            sl = slice(trim, t.shape[0] - trim)
            tau.append(t[sl].flatten())
            rg.append(torch.tensordot(rule.transfers[1].G[st], gk, dims=1)[sl].flatten())
    return float(torch.cat(tau).norm() / torch.cat(rg).norm())


@pytest.mark.parametrize("prolongation,trim", [("constant", 0), ("linear", 1)])
def test_coarse_model_is_consistent_in_h(prolongation, trim):
    """P^T carries the h-scaling: the coherence term v = grad f_H(R x) - P^T grad f_h(x) is O(h) relative
    to P^T grad f_h (slope ~1 in h); for ``linear`` away from the two end slots, where its hat functions
    are cut (documented in msnet.methods.mgopt)."""
    ns = [8, 16, 32, 64]
    gaps = [_coherence_gap(prolongation, n, trim) for n in ns]
    slope = np.polyfit(np.log([1.0 / n for n in ns]), np.log(gaps), 1)[0]
    assert 0.8 < slope < 1.3, (gaps, slope)
    assert gaps[-1] < 0.1


def test_linear_prolongation_end_slots_are_not_consistent():
    """The documented exception: at the last coarse slot P^T sums 5/2 fine slices against the coarse
    network's 2, so there v stays O(1) relative as h -> 0."""
    model = tiny_net(layers=32)
    with torch.no_grad():
        for p in model.blocks[0].step_parameters().values():
            p.copy_(p[:1].expand_as(p))
    rule = MGOpt(model, MGOptConfig(levels=2), ADAM, NO_REG, 1, None)
    xb, yb = batch(n=32)
    _, _, _, g = rule.prepare_coarse(1, xb, yb)
    k = rule.levels[1].names.index("blocks.0.params.b")
    rg = torch.tensordot(rule.transfers[1].G[0], g[k], dims=1)
    gc = rule.levels[0].tau[k] + rg  # the coarse network's own gradient
    ratio = float(rg[-1].norm() / gc[-1].norm())
    assert ratio == pytest.approx(1.25, rel=0.1)


def test_prolonged_coarse_step_is_the_predicted_descent_step():
    """One coarse SGD step from R x: e_H = -eta grad psi_H(R x) = -eta P^T g, so the cycle moves the fine
    weights by exactly P e_H (shared variables by -eta g), its directional derivative is -eta ||P^T g||^2 < 0
    and the batch loss drops."""
    model = tiny_net(layers=8, stages=2)
    sgd = OmegaConf.create({"name": "sgd", "lr": 0.05, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0,
                            "scheduler": "constant"})
    rule = MGOpt(model, MGOptConfig(levels=2, nu1=0, nu2=0, coarse_steps=1), sgd, NO_REG, 1, None)
    xb, yb = batch()
    fine = rule.levels[1]
    x0 = [p.detach().clone() for p in fine.params]
    g = grads_of(fine, xb, yb)
    rg = restrict_grad(fine, g)
    out = rule.step(xb, yb)
    slope = -0.05 * sum(float((r * r).sum()) for r in rg)
    assert out.info["slope"] == pytest.approx(slope, rel=1e-10) and slope < 0
    for name, p, a, r, st in zip(fine.names, fine.params, x0, rg, fine.stage):
        step = -0.05 * (r if st is None else torch.tensordot(linear_P(r.shape[0]), r, dims=1))
        torch.testing.assert_close(p.detach(), a + step, rtol=1e-12, atol=1e-14, msg=name)
    assert out.info["loss_after"] < out.info["loss_before"]
    assert out.info["grad_evals"] == [2, 1]  # coarse: v's gradient + one step; fine: the gradient at x


@pytest.mark.parametrize("line_search", ["none", "armijo"])
def test_zero_coarse_iterations_is_plain_training(line_search):
    """coarse_steps=0: every cycle is nu1 + nu2 steps of the fine optimiser, bit for bit."""
    model = tiny_net(layers=4, dtype=torch.float32)
    reference = copy.deepcopy(model)
    settings = MGOptConfig(levels=2, nu1=2, nu2=1, coarse_steps=0, line_search=line_search)
    rule = MGOpt(model, settings, ADAM, NO_REG, 1, None)
    plain = FirstOrder(reference, build_optimizer(reference.parameters(), ADAM))
    for seed in (1, 2):
        xb, yb = batch(torch.float32, seed=seed)
        out = rule.step(xb, yb)
        outs = [plain.step(xb, yb) for _ in range(3)]
        assert float(out.loss) == float(outs[0].loss)
        assert out.info["alpha"] == 0.0
        for a, b in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # one coarse step changes the result: the comparison above can fail
    other = MGOpt(copy.deepcopy(reference), MGOptConfig(levels=2, nu1=2, nu2=1, coarse_steps=1), ADAM, NO_REG, 1,
                  None)
    other.step(xb, yb)
    plain.step(xb, yb), plain.step(xb, yb), plain.step(xb, yb)
    assert any(not torch.equal(a, b) for a, b in zip(other.model.parameters(), reference.parameters()))


def test_cycles_count_work_and_armijo_never_increases_the_objective():
    model = tiny_net(layers=8)
    rule = MGOpt(model, MGOptConfig(levels=3, cycle="W", nu1=1, nu2=1, coarse_steps=3, line_search="armijo",
                                      cycle_loss=False), ADAM, NO_REG, 1, None)
    xb, yb = batch()
    out = rule.step(xb, yb)
    info = out.info
    # W-cycle of 3 levels, gamma = 2. Fine: nu1 + gradient for v + nu2. Level 1: the gradient for the
    # fine correction's v, then 2 cycles of nu1 + gradient for its own correction + nu2. Level 0: per
    # level-1 cycle, the gradient for v and 2 x coarse_steps.
    assert info["grad_evals"] == [2 * (1 + 2 * 3), 1 + 2 * (1 + 1 + 1), 1 + 1 + 1]
    work = info["grad_evals"][0] / 4 + info["grad_evals"][1] / 2 + info["grad_evals"][2] \
        + sum(f * c for f, c in zip(info["forward_evals"], (0.25, 0.5, 1.0))) / 3
    assert info["work_fge"] == pytest.approx(work)
    assert info["alpha"] == 0.0 or info["psi_corrected"] <= info["psi_pre"]
    assert "loss_after" not in info
    stats = rule.epoch_stats()
    assert stats["work_fge"] == pytest.approx(work) and stats["cycles"] == 1
    assert stats["grad_evals"] == info["grad_evals"]


def test_armijo_correction_is_checked_outside_the_cycle():
    """One V-cycle with no smoothing and Nash's line search, checked from outside the rule: psi before is the
    batch loss of the starting weights, psi after that of the final ones (the network's forward pass here),
    the move of the weights is alpha e with the reported alpha, the slope <g, e> uses the gradient autograd
    gives at the start, e is a descent direction, and the Armijo condition holds on these numbers."""
    model = tiny_net(layers=8)
    sgd = OmegaConf.create({"name": "sgd", "lr": 0.2, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0,
                            "scheduler": "constant"})
    settings = MGOptConfig(levels=2, nu1=0, nu2=0, coarse_steps=3, line_search="armijo")
    rule = MGOpt(model, settings, sgd, NO_REG, 1, None)
    xb, yb = batch()
    start = copy.deepcopy(model)
    loss0 = F.cross_entropy(start(xb), yb)
    g = torch.autograd.grad(loss0, list(start.parameters()))
    loss0 = float(loss0.detach())
    info = rule.step(xb, yb).info
    with torch.no_grad():
        loss1 = float(F.cross_entropy(model(xb), yb))
    alpha = info["alpha"]
    assert alpha > 0  # this setting takes a step: the checks below are not vacuous
    moves = [(p.detach() - q.detach()) for p, q in zip(model.parameters(), start.parameters())]
    slope = sum(float((gk * mk).sum()) for gk, mk in zip(g, moves)) / alpha
    assert info["psi_pre"] == pytest.approx(loss0, rel=1e-12)
    assert info["psi_corrected"] == pytest.approx(loss1, rel=1e-12) and info["loss_after"] == pytest.approx(loss1)
    assert info["slope"] == pytest.approx(slope, rel=1e-8) and slope < 0
    assert loss1 <= loss0 + settings.armijo_c1 * alpha * slope
    # a correction the line search rejects (a coarse solve that diverges, no backtracking) leaves the weights
    # where the cycle found them
    wild = MGOptConfig(levels=2, nu1=0, nu2=0, coarse_steps=3, line_search="armijo", max_backtracks=0,
                         coarse_lr_factor=1e3)
    start = copy.deepcopy(model)
    info = MGOpt(model, wild, sgd, NO_REG, 1, None).step(xb, yb).info
    assert info["alpha"] == 0.0 and info["psi_corrected"] is None
    for p, q in zip(model.parameters(), start.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_config_composes_as_typed_and_builds_the_hierarchy(compose_cfg):
    cfg = compose_cfg("train", ["trainer=mgopt", "trainer.levels=3", "trainer.cycle=V", "trainer.nu1=1",
                                "trainer.nu2=1", "model.layers=8"])
    assert cfg.trainer.name == "mgopt" and cfg.trainer.levels == 3 and cfg.trainer.nu1 == 1
    model = tiny_net(layers=8, dtype=torch.float32)
    rule = build_update(model, cfg, cfg.optimizer, cfg.trainer.epochs, None)
    assert isinstance(rule, MGOpt)
    assert [lv.net.depth() for lv in rule.levels] == [[2], [4], [8]]
    assert rule.levels[-1].net is model
    with pytest.raises(Exception, match="nu3"):
        compose_cfg("train", ["trainer=mgopt", "trainer.nu3=1"])


@pytest.mark.parametrize("overrides,message", [
    (["model.layers=2", "trainer.levels=3"], "multiple of 4"),
    (["model.layers=6", "trainer.levels=3"], "use model.layers=8 or trainer.levels=2"),
    (["trainer.levels=1"], "trainer.levels must be at least 2"),
    (["trainer.nu1=-1"], "trainer.nu1 must be >= 0"),
    (["trainer.prolongation=cubic"], "unknown time prolongation 'cubic'"),
])
def test_bad_settings_fail_with_one_line(tiny_cfg, tmp_path, overrides, message):
    """Values the schema cannot judge (ranges, registries, the depth) fail in one line; closed choices fail at
    composition (test_config.py::test_closed_choices_fail_at_composition_with_the_valid_values)."""
    cfg = tiny_cfg(["trainer=mgopt", "model.layers=4", "threads=1"] + overrides)
    with pytest.raises(MsnetError, match=message) as err:
        train(cfg, tmp_path / "run")
    assert "\n" not in str(err.value)


def test_coarse_depths():
    assert coarse_depths([8, 16], 3) == [[2, 4], [4, 8], [8, 16]]
    with pytest.raises(MsnetError, match="use model.layers=12 or trainer.levels=2"):
        coarse_depths([10], 3)


def test_resume_equals_uninterrupted_run(tiny_cfg, tmp_path, cut_and_resume):
    over = ["trainer=mgopt", "model.layers=4", "trainer.epochs=3", "threads=1", "trainer.coarse_steps=2"]
    train(tiny_cfg(over), tmp_path / "full")
    ck, _ = cut_and_resume(over, 3)
    assert len(ck["mgopt"]["levels"]) == 1 and ck["mgopt"]["levels"][0]["optimizer"]["state"]
    full, resumed = (strip_times(read_metrics(tmp_path / d)) for d in ("full", "resumed"))
    assert resumed == full and full[-1]["work_fge"] > 0
    assert_same_weights(tmp_path / "full" / "checkpoints" / "last.pt", tmp_path / "resumed" / "checkpoints" / "last.pt")
    a, b = (load_checkpoint(tmp_path / d / "checkpoints" / "last.pt") for d in ("full", "resumed"))
    assert a["mgopt"]["work_fge"] == b["mgopt"]["work_fge"]


@pytest.mark.slow
@needs_fashion
def test_real_fashion_run_learns(fashion_cfg, tmp_path):
    cfg = fashion_cfg(["trainer=mgopt", "model.layers=4", "trainer.levels=2", "threads=1",
                       "dataset.train_subset=1280", "dataset.val_size=500", "dataset.test_subset=1000"])
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed"
    assert summary["final_test_acc"] > 0.6  # chance is 0.10
    metrics = read_metrics(tmp_path / "run")
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"]
    assert 0 < metrics[0]["work_fge"] < metrics[1]["work_fge"]
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 2 * math.ceil(1280 / 128)
    # the cycle lowers the fine-level loss on its batch
    assert np.mean([s["loss_after"] < s["loss_before"] for s in steps]) > 0.9


def test_a_resumed_hierarchy_keeps_its_saved_depths():
    """MG/OPT and RMTR refuse, in one line, a checkpoint whose hierarchy has other depths than the run builds."""
    from types import SimpleNamespace

    from msnet.methods.hierarchy import check_saved_depths

    levels = [SimpleNamespace(net=SimpleNamespace(depth=lambda d=d: [d])) for d in (2, 4)]
    check_saved_depths(levels, [[2], [4]], "MG/OPT", "a.pt")  # the same depths: nothing to say
    with pytest.raises(MsnetError, match=r"^checkpoint a.pt holds an RMTR hierarchy of depths \[\[4\], \[8\]\], "
                                         r"this run builds \[\[2\], \[4\]\]; keep trainer.levels as saved$"):
        check_saved_depths(levels, [[4], [8]], "RMTR", "a.pt")

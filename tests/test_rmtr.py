"""RMTR (trainer=rmtr): L-SR1, the trust-region subproblem and radius rules, first-order coherence, the fine
radius bound on prolonged steps, descent of accepted steps, reduction to the single-level trust-region method,
the adaptive sample, work accounting, config errors, resume, a real Fashion-MNIST run."""

from __future__ import annotations

import copy
import json
import math
from typing import List, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from msnet import MsnetError
from msnet.config import RMTRConfig
from msnet.runs import load_checkpoint, read_metrics
from msnet.methods import build_update
from msnet.training import train
from msnet.methods.hierarchy import couple_coarse
from msnet.methods.regularizers import build_regularizer
from msnet.methods.rmtr import LSR1, RMTR, flat, model_decrease, next_radius, steihaug

from .conftest import assert_same_weights, needs_fashion, strip_times
from .test_mgopt import batch, linear_P, tiny_net

NO_REG = OmegaConf.create({"classifier_smoothness": 0.0, "stencil_smoothness": 0.0})

pytestmark = pytest.mark.usefixtures("one_thread")


def dense_sr1(pairs: List[Tuple[torch.Tensor, torch.Tensor]], gamma: float, skip: float, n: int):
    """The SR1 matrix from gamma I through ``pairs`` (oldest first), written out densely; returns (B, kept)."""
    B = gamma * torch.eye(n, dtype=torch.float64)
    kept = []
    for s, y in pairs:
        r = y - B @ s
        rs = float(r @ s)
        if rs != 0.0 and abs(rs) >= skip * float(s.norm() * r.norm()):
            B = B + torch.outer(r, r) / rs
            kept.append((s, y))
    return B, kept


def random_symmetric(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (A + A.T) / 2 + shift * torch.eye(n, dtype=torch.float64)


# --- L-SR1 -------------------------------------------------------------------------------------
def test_lsr1_matvec_secant_and_hereditary_on_a_quadratic():
    """On y = A s (A indefinite): B s = y for the newest pair and, SR1's hereditary property, every kept pair;
    B is symmetric and its matvec equals the dense SR1 recursion from gamma I; gamma = y.y / s.y."""
    n, A = 12, random_symmetric(12, 0)
    g = torch.Generator().manual_seed(1)
    B = LSR1(memory=4, skip=1e-8, gamma0=1.0)
    pairs = []
    for k in range(7):
        s = torch.randn(n, generator=g, dtype=torch.float64)
        y = A @ s
        assert B.update(s, y)
        pairs = (pairs + [(s, y)])[-4:]
        torch.testing.assert_close(B.matvec(s), y, rtol=1e-10, atol=1e-10)
        for sj, yj in zip(B.S, B.Y):
            torch.testing.assert_close(B.matvec(sj), yj, rtol=1e-8, atol=1e-8)
        if float(s @ y) > 0:
            assert B.gamma == pytest.approx(float(y @ y) / float(s @ y))
        dense, _ = dense_sr1(pairs, B.gamma, 1e-8, n)
        u, v = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
        torch.testing.assert_close(B.matvec(u), dense @ u, rtol=1e-10, atol=1e-10)
        assert float(u @ B.matvec(v)) == pytest.approx(float(v @ B.matvec(u)), rel=1e-10)
    assert len(B.S) == 4 and B.S[-1] is s


def test_lsr1_skip_rule_leaves_the_matrix_alone():
    """A pair with y = B s (r = 0) or with r almost orthogonal to s is skipped and nothing changes; memory=0 never
    stores a pair."""
    n = 6
    B = LSR1(memory=3, skip=1e-3, gamma0=2.0)
    e = torch.eye(n, dtype=torch.float64)
    assert not B.update(e[0], 5.0 * e[0])  # y parallel to s: gamma = y.y / s.y = 5 already gives B s = y, r = 0
    assert B.update(e[0], 5.0 * e[0] + e[1])  # gamma = 26 / 5, r = (-0.2, 1, 0, ...): kept
    state = B.state_dict()
    assert state["gamma"] == pytest.approx(5.2)
    # B = [[5, 1], [1, 0.2]] on (e_0, e_1): B s = 0 for s = (1, -5) / sqrt(26). y = B s + r, r = e_2 + 1e-5 s:
    # |s.r| = 1e-5 ||s|| ||r|| is below the threshold 1e-3 (and s.y = 1e-5 is too small to set gamma)
    s = (e[0] - 5.0 * e[1]) / math.sqrt(26.0)
    assert float(B.matvec(s).norm()) < 1e-12
    assert not B.update(s, B.matvec(s) + e[2] + 1e-5 * s)
    after = B.state_dict()
    assert after["gamma"] == state["gamma"] and len(after["S"]) == 1 and after["c"] == state["c"]
    assert not LSR1(memory=0, skip=1e-8, gamma0=1.0).update(e[0], e[0] + e[1])


# --- the trust-region subproblem and the radius ------------------------------------------------
@pytest.mark.parametrize("shift,radius", [(20.0, 1e3), (20.0, 0.05), (0.0, 0.5), (-20.0, 0.5), (-20.0, 1e3)])
def test_steihaug_respects_the_radius_and_decreases_the_model(shift, radius):
    """||s|| <= radius; m(s) <= the Cauchy decrease -1/2 ||g|| min(radius, ||g|| / ||B||) < 0; positive definite B
    with a large radius: the Newton step -B^-1 g; indefinite B: on the boundary."""
    n = 30
    B = random_symmetric(n, 3, shift)
    g = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    s, boundary = steihaug(g, lambda v: B @ v, radius, max_iter=200, tol=1e-12)
    assert float(s.norm()) <= radius * (1 + 1e-12)
    decrease = model_decrease(g, s, lambda v: B @ v)
    cauchy = 0.5 * float(g.norm()) * min(radius, float(g.norm()) / float(torch.linalg.matrix_norm(B, 2)))
    assert decrease >= cauchy > 0
    eig = torch.linalg.eigvalsh(B)
    if eig.min() > 0 and float(torch.linalg.solve(B, g).norm()) < radius:
        torch.testing.assert_close(s, -torch.linalg.solve(B, g), rtol=1e-9, atol=1e-9)
        assert not boundary
    else:
        assert boundary and float(s.norm()) == pytest.approx(radius, rel=1e-12)


def test_radius_rules():
    s = RMTRConfig(eta1=0.1, eta2=0.75, gamma1=0.5, gamma2=2.0, radius_max=3.0)
    assert next_radius(1.0, 1.0, 0.05, True, s) == 0.5  # rejected: gamma1 times the step's radius
    assert next_radius(1.0, 0.4, -3.0, False, s) == 0.2  # a room-limited step's radius is what shrinks
    assert next_radius(1.0, 1.0, 0.5, True, s) == 1.0  # successful: kept
    assert next_radius(1.0, 1.0, 0.9, False, s) == 1.0  # very successful inside the region: kept
    assert next_radius(1.0, 1.0, 0.9, True, s) == 2.0  # very successful at the boundary: grows
    assert next_radius(2.0, 2.0, 0.9, True, s) == 3.0  # up to radius_max
    assert next_radius(1.0, 0.3, 0.9, True, s) == 1.0  # a room-limited success never shrinks the radius


# --- coherence, the radius of prolonged steps, descent --------------------------------------------
@pytest.mark.parametrize("integrator", ["euler", "lm"])
def test_first_order_coherence_on_every_level(integrator):
    """The coarse objective's gradient at R x equals P^T grad psi_fine(x) to float64 round-off, for both
    coarse levels of a 3-level hierarchy (the middle one's objective carries its own coherence term), with
    the regulariser; without the coherence term it would not."""
    model = tiny_net(layers=8, stages=2, integrator=integrator)
    reg = OmegaConf.create({"classifier_smoothness": 1e-3, "stencil_smoothness": 1e-2})
    rule = RMTR(model, RMTRConfig(levels=3), reg, build_regularizer(model, reg))
    xb, yb = batch()
    assert [lv.net.depth() for lv in rule.levels] == [[2, 2], [4, 4], [8, 8]]
    for i in (2, 1):
        fine, coarse = rule.levels[i], rule.levels[i - 1]
        _, _, _, g = fine.gradient(xb, yb)
        couple_coarse(fine, coarse, rule.transfers[i], g, xb, yb)
        _, _, _, gc = coarse.gradient(xb, yb)
        want = [gk if st is None else torch.tensordot(linear_P(gk.shape[0] // 2).T, gk, dims=1)
                for gk, st in zip(g, fine.stage)]
        scale = max(float(w.abs().max()) for w in want)
        for name, a, b in zip(coarse.names, gc, want):
            assert float((a - b).abs().max()) <= 1e-13 * scale, name
        assert max(float(t.abs().max()) for t in coarse.tau) > 1e-6 * scale


@pytest.mark.parametrize("levels", [2, 3])
def test_prolonged_coarse_step_respects_the_fine_radius(levels):
    """With no fine smoothing a cycle moves the fine weights by the prolonged coarse step alone: its norm, measured
    on the weights, stays within the fine radius although the coarse levels take several steps, and uses most of
    it (the bound is not met trivially). ||P||_2 is the hand-written linear prolongation's."""
    model = tiny_net(layers=8, stages=2)
    radius = 0.05
    rule = RMTR(model, RMTRConfig(levels=levels, nu1=0, nu2=0, coarse_steps=6, radius=radius, window_max=1),
                NO_REG, None)
    xb, yb = batch()
    x0 = flat(list(model.parameters()))
    info = rule.step(xb, yb).info
    moved = float((flat(list(model.parameters())) - x0).norm())
    assert info["coarse"] == "accepted" and [t["kind"] for t in info["trials"]] == ["coarse"]
    assert 0.5 * radius < moved <= radius * (1 + 1e-12)
    assert info["tr_trials"][0] >= 2  # the coarsest level took more than one step inside its room
    nc = rule.levels[0].net.depth()[0]
    assert rule.p_norm[1] == pytest.approx(float(torch.linalg.matrix_norm(linear_P(nc), 2)), rel=1e-12)


def window_objective(model, xw, yw, penalty=None) -> float:
    """psi on a sample, recomputed with the network's own forward pass (outside RMTR's code path)."""
    with torch.no_grad():
        loss = F.cross_entropy(model(xw), yw)
        return float(loss + penalty()) if penalty is not None else float(loss)


def test_each_accepted_step_decreases_the_objective_and_a_rejected_one_changes_nothing():
    """One level, one step per batch: an accepted step lowers the batch objective by at least eta1 times the
    model's predicted decrease (recomputed here); a rejected one leaves the weights bit for bit."""
    model = tiny_net(layers=4)
    reg = OmegaConf.create({"classifier_smoothness": 1e-3, "stencil_smoothness": 1e-2})
    penalty = build_regularizer(model, reg)
    rule = RMTR(model, RMTRConfig(levels=1, nu1=1, nu2=0, radius=1.0, eta1=0.1, window_max=1), reg, penalty)
    seen = {True: 0, False: 0}
    for seed in range(12):
        xb, yb = batch(seed=seed)
        x0 = [p.detach().clone() for p in model.parameters()]
        before = window_objective(model, xb, yb, penalty)
        trial = rule.step(xb, yb).info["trials"][0]
        after = window_objective(model, xb, yb, penalty)
        seen[trial["accepted"]] += 1
        if trial["accepted"]:
            assert before - after >= 0.1 * trial["pred"] * (1 - 1e-9) > 0
        else:
            assert all(torch.equal(a, b) for a, b in zip(x0, model.parameters()))
    assert seen[True] and seen[False]  # both branches were exercised


def test_a_cycle_never_increases_its_objective():
    """Two levels with smoothing and a growing sample: psi on the cycle's sample, recomputed here, is what the
    rule reports before and after, and drops whenever a finest-level trial was accepted."""
    model = tiny_net(layers=8)
    rule = RMTR(model, RMTRConfig(levels=2, radius=0.5, window_max=2, grow_patience=1), NO_REG, None)
    xs, ys = [], []
    for seed in range(6):
        xb, yb = batch(seed=seed)
        xs, ys = (xs + [xb])[-rule.k:], (ys + [yb])[-rule.k:]
        xw, yw = torch.cat(xs), torch.cat(ys)
        before = window_objective(model, xw, yw)
        info = rule.step(xb, yb).info
        after = window_objective(model, xw, yw)
        assert info["samples"] == yw.shape[0]
        assert info["psi_before"] == pytest.approx(before, rel=1e-12)
        assert info["psi_after"] == pytest.approx(after, rel=1e-12)
        if any(t["accepted"] for t in info["trials"]):
            assert after < before
        else:
            assert after == before
    assert rule.k == 2  # the window grew within these cycles


# --- reduction to the single-level trust-region method --------------------------------------------
def reference_trust_region(model, batches, s: RMTRConfig) -> Tuple[torch.Tensor, float]:
    """The single-level L-SR1 trust-region method written out with dense matrices: per batch, nu1 + nu2 steps of
    Steihaug-CG on m(s) = g.s + 1/2 s.Bs, ratio test, radius rule; B rebuilt densely from the kept pairs."""
    params = list(model.parameters())
    n = sum(p.numel() for p in params)

    def value_grad(x, xb, yb):
        with torch.no_grad():
            for p, c in zip(params, x.split([p.numel() for p in params])):
                p.copy_(c.view_as(p))
        loss = F.cross_entropy(model(xb), yb)
        return float(loss.detach()), flat(torch.autograd.grad(loss, params))

    x, radius, gamma, pairs = flat(params), s.radius, s.sr1_gamma0, []
    for xb, yb in batches:
        psi, g = value_grad(x, xb, yb)
        for _ in range(s.nu1 + s.nu2):
            B, _ = dense_sr1(pairs, gamma, s.sr1_skip, n)
            step, boundary = steihaug(g, lambda v: B @ v, radius, 2 * s.memory + 2)
            pred = -float(g @ step) - 0.5 * float(step @ B @ step)
            if pred <= 0:
                continue
            psi_t, g_t = value_grad(x + step, xb, yb)
            y = g_t - g
            sy = float(step @ y)
            new_gamma = float(y @ y) / sy if sy > 0 and sy > s.sr1_skip * float(step.norm() * y.norm()) else gamma
            _, kept = dense_sr1((pairs + [(step, y)])[-s.memory:], new_gamma, s.sr1_skip, n)
            if kept and kept[-1][0] is step:
                pairs, gamma = kept, new_gamma
            rho = (psi - psi_t) / pred
            if rho >= s.eta1:
                x, psi, g = x + step, psi_t, g_t
                if rho > s.eta2 and (boundary or float(step.norm()) >= (1 - 1e-3) * radius):
                    radius = min(s.gamma2 * radius, s.radius_max)
            else:
                radius = s.gamma1 * radius
    return x, radius


def test_one_level_is_the_single_level_trust_region_method():
    """trainer.levels=1 follows the dense reference trajectory to float64 round-off (memory 3 over 15 steps, so
    pairs are dropped and B rebuilt)."""
    settings = RMTRConfig(levels=1, nu1=2, nu2=1, memory=3, radius=0.3, window_max=1)
    model = tiny_net(layers=4)
    reference = copy.deepcopy(model)
    batches = [batch(seed=k) for k in range(5)]
    rule = RMTR(model, settings, NO_REG, None)
    infos = [rule.step(xb, yb).info for xb, yb in batches]
    x_ref, radius_ref = reference_trust_region(reference, batches, settings)
    torch.testing.assert_close(flat(list(model.parameters())), x_ref, rtol=1e-9, atol=1e-11)
    assert rule.levels[0].radius == pytest.approx(radius_ref, rel=1e-12)
    trials = [t for i in infos for t in i["trials"]]
    assert len(trials) == 15 and any(t["accepted"] for t in trials) and len(rule.levels[0].B.S) == 3


def test_skipping_every_coarse_correction_is_the_one_level_method():
    """Two levels whose coarse correction is always skipped (kappa_g huge) take the one-level steps bit for bit and
    spend no coarse gradient."""
    a, b = tiny_net(layers=4, dtype=torch.float32), tiny_net(layers=4, dtype=torch.float32)
    one = RMTR(a, RMTRConfig(levels=1, window_max=1), NO_REG, None)
    two = RMTR(b, RMTRConfig(levels=2, kappa_g=1e30, window_max=1), NO_REG, None)
    for seed in (1, 2, 3):
        xb, yb = batch(torch.float32, seed=seed)
        one.step(xb, yb)
        info = two.step(xb, yb).info
        assert info["coarse"] == "small_gradient" and info["grad_evals"][0] == 0
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# --- the sample, work, config -------------------------------------------------------------------
def test_the_window_doubles_after_failed_ratio_tests_and_after_a_stall():
    rule = RMTR(tiny_net(layers=4), RMTRConfig(levels=1, window_max=4, grow_patience=2), NO_REG, None)
    assert not rule._grow(1.0, any_accepted=False) and rule._grow(1.0, any_accepted=False) and rule.k == 2
    # a stall: the mean of the last w = 2 starting values is not below that of the 2 before
    assert [rule._grow(v, True) for v in (1.0, 0.9, 0.95, 0.95)] == [False, False, False, True] and rule.k == 4
    assert not rule._grow(1.0, False) and not rule._grow(1.0, False) and rule.k == 4  # capped at window_max
    # decreasing values do not grow it
    fresh = RMTR(tiny_net(layers=4), RMTRConfig(levels=1, grow_patience=2), NO_REG, None)
    assert not any(fresh._grow(v, True) for v in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5))
    # the sample is the last k batches of the epoch, the handed batch last; the epoch's end empties it
    batches = [batch(seed=k) for k in range(5)]
    for xb, yb in batches:
        xw, yw = rule._sample(xb, yb)
    assert torch.equal(yw, torch.cat([b[1] for b in batches[-4:]]))
    rule.end_epoch()
    assert rule._sample(*batches[0])[0].shape[0] == 16


def test_work_counts_every_trial():
    """grad_evals: fine = the cycle's first gradient + one per fine trial; coarse = one for the coherence term per
    correction tried + one per coarse trial; work = batches in the sample x sum_l grads_l N_l / N_L."""
    model = tiny_net(layers=8)
    rule = RMTR(model, RMTRConfig(levels=3, coarse_steps=3, radius=0.5, window_max=2, grow_patience=1),
                NO_REG, None)
    total = 0.0
    for seed in range(3):
        info = rule.step(*batch(seed=seed)).info
        assert info["grad_evals"][-1] == 1 + info["tr_trials"][-1] == 1 + len(info["trials"])
        couplings = [info["grad_evals"][k] - info["tr_trials"][k] for k in (0, 1)]
        assert couplings[1] == int(info["coarse"] != "small_gradient") and couplings[0] in (0, 1)
        assert info["tr_trials"][0] >= couplings[0]  # the coarsest level stepped whenever it was set up
        work = info["window"] * sum(gk * c for gk, c in zip(info["grad_evals"], (0.25, 0.5, 1.0)))
        assert info["work_fge"] == pytest.approx(work)
        total += work
    stats = rule.epoch_stats()
    assert stats["work_fge"] == pytest.approx(total) and stats["cycles"] == 3 and stats["rmtr_window"] == rule.k
    assert 0 <= stats["rmtr_accepted"] <= 1


def test_config_composes_as_typed_and_builds_the_hierarchy(compose_cfg):
    cfg = compose_cfg("train", ["trainer=rmtr", "trainer.levels=3", "model.layers=8", "trainer.memory=3"])
    assert cfg.trainer.name == "rmtr" and cfg.trainer.levels == 3 and cfg.trainer.memory == 3
    model = tiny_net(layers=8, dtype=torch.float32)
    rule = build_update(model, cfg, cfg.optimizer, cfg.trainer.epochs, None)
    assert isinstance(rule, RMTR) and rule.levels[-1].net is model
    assert [lv.net.depth() for lv in rule.levels] == [[2], [4], [8]]
    with pytest.raises(Exception, match="nu3"):
        compose_cfg("train", ["trainer=rmtr", "trainer.nu3=1"])


@pytest.mark.parametrize("overrides,message", [
    (["trainer.levels=0"], r"^trainer.levels must be at least 1"),
    (["trainer.levels=3"], r"multiple of 4 steps; use model.layers=4 or trainer.levels=2"),
    (["trainer.levels=1", "trainer.nu1=0", "trainer.nu2=0"], r"^trainer.levels=1 takes nu1 \+ nu2"),
    (["trainer.coarse_steps=0"], r"^trainer.coarse_steps must be >= 1 with trainer.levels >= 2"),
    (["trainer.radius=0"], r"^trainer.radius must be in \(0, radius_max=10.0\]"),
    (["trainer.eta1=0.8", "trainer.eta2=0.5"], r"^need 0 < trainer.eta1 <= trainer.eta2 < 1"),
    (["trainer.gamma1=1.5"], r"^trainer.gamma1 must be in \(0, 1\)"),
    (["trainer.sr1_skip=-1"], r"^trainer.sr1_skip must be in \[0, 1\)"),
    (["trainer.window_max=0"], r"^trainer.window_max must be at least 1"),
    (["trainer.prolongation=cubic"], r"^unknown time prolongation 'cubic'"),
    (["optimizer=bcd"], r"^trainer=rmtr takes trust-region steps, not optimizer=bcd"),
    (["optimizer.weight_decay=0.1"], r"^trainer=rmtr does not use the optimizer's weight decay"),
    (["trainer.grad_clip=1.0"], r"^trainer=rmtr bounds its steps by the trust region; drop trainer.grad_clip"),
    (["model.stochastic_depth.p_last=0.5"], r"^trainer=rmtr's ratio test needs a deterministic objective"),
])
def test_bad_settings_fail_in_preflight_with_one_line(tiny_cfg, tmp_path, monkeypatch, overrides, message):
    """Ranges, registries, the depth and what the rule refuses fail in one line before the data is loaded
    (the depth check builds no data either: it needs only model.layers)."""
    from msnet.training import api

    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the config was checked")

    if "multiple of" not in message:
        monkeypatch.setattr(api, "prepare_data", no_data)
    cfg = tiny_cfg(["trainer=rmtr", "threads=1"] + overrides)
    with pytest.raises(MsnetError, match=message) as err:
        train(cfg, tmp_path / "run")
    assert "\n" not in str(err.value)


# --- runs ---------------------------------------------------------------------------------------
def test_resume_equals_uninterrupted_run(tiny_cfg, tmp_path, cut_and_resume):
    """The radius, the L-SR1 pairs, the window and the growth counters come back from the checkpoint: a run cut
    in its third epoch and resumed writes the same metrics and weights as one that never stopped."""
    over = ["trainer=rmtr", "model.layers=4", "trainer.epochs=3", "threads=1", "trainer.grow_patience=1",
            "trainer.window_max=2", "trainer.memory=3"]
    train(tiny_cfg(over), tmp_path / "full")
    ck, _ = cut_and_resume(over, 3)
    assert ck["rmtr"]["window"] == 2 and all(len(lv["S"]) for lv in ck["rmtr"]["lsr1"])
    full, resumed = (strip_times(read_metrics(tmp_path / d)) for d in ("full", "resumed"))
    assert resumed == full and full[-1]["work_fge"] > 0
    assert_same_weights(tmp_path / "full" / "checkpoints" / "last.pt", tmp_path / "resumed" / "checkpoints" / "last.pt")
    a, b = (load_checkpoint(tmp_path / d / "checkpoints" / "last.pt") for d in ("full", "resumed"))
    assert a["rmtr"]["radius"] == b["rmtr"]["radius"] and a["rmtr"]["work_fge"] == b["rmtr"]["work_fge"]


@pytest.mark.slow
@needs_fashion
def test_real_fashion_run_learns(fashion_cfg, tmp_path):
    cfg = fashion_cfg(["trainer=rmtr", "model.layers=4", "trainer.levels=2", "threads=1",
                       "dataset.train_subset=1280", "dataset.val_size=500", "dataset.test_subset=1000"])
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed"
    assert summary["final_test_acc"] > 0.6  # chance is 0.10
    metrics = read_metrics(tmp_path / "run")
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"]
    assert 0 < metrics[0]["work_fge"] < metrics[1]["work_fge"]
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 2 * math.ceil(1280 / 128)
    # every cycle ends no higher on its own sample than it started, and most lower it
    assert all(s["psi_after"] <= s["psi_before"] for s in steps)
    assert np.mean([s["psi_after"] < s["psi_before"] for s in steps]) > 0.9


@pytest.mark.parametrize("trainer", ["rmtr", "mgopt"])
def test_nested_iteration_gives_a_shallow_network_the_levels_its_depth_allows(tiny_cfg, tmp_path, trainer):
    """Under +depth=doubling (nested iteration) trainer.levels applies at the final depth; a shallower network
    that cannot halve that often gets the levels its depth allows (2 layers: 2 levels), instead of failing at
    the first level. The final depth still refuses too many levels in preflight."""
    cfg = tiny_cfg([f"trainer={trainer}", "trainer.levels=3", "+depth=doubling", "depth.start=2", "depth.stop=8",
                    "model.layers=8", "trainer.epochs=1"])
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and [lv["layers"] for lv in summary["levels"]] == [2, 4, 8]
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    key = "radius" if trainer == "rmtr" else "grad_evals"  # one entry per level, coarsest first
    by_epoch = {}
    for s in steps:
        by_epoch.setdefault(s["epoch"], len(s[key]))
    assert list(by_epoch.values()) == [2, 3, 3]  # 2 layers: 1/2 steps; 4 and 8 layers: 3 levels
    with pytest.raises(MsnetError, match="trainer.levels=5 halves"):
        train(tiny_cfg([f"trainer={trainer}", "trainer.levels=5", "model.layers=8"]), tmp_path / "bad")

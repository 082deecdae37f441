"""Shallow-to-deep: time operators, the O(h) consistency of prolonged networks, depth schedules, transfer in time."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msnet import MsnetError
from msnet.core import INTEGRATORS, ModelSpec, StageSpec, build_model
from msnet.multigrid import transfer_depth
from msnet.multigrid.time import (
    TIME_PROLONGATIONS, TIME_RESTRICTIONS, prolong_constant, prolong_linear, restrict_average, restrict_injection,
)
from msnet.runs import load_checkpoint, read_metrics
from msnet.training import train
from msnet.training.schedule import build_schedule, depth_levels
from msnet.tasks.transfer import transfer_checkpoint

from .conftest import loglog_slope

EXACT_PAIRS = [("linear", "injection"), ("constant", "injection"), ("constant", "average")]


@settings(max_examples=30, deadline=None)
@given(pair=st.sampled_from(EXACT_PAIRS), n=st.integers(1, 9), r=st.integers(2, 4), seed=st.integers(0, 2**31 - 1))
def test_restrict_prolong_is_identity_for_exact_pairs(pair, n, r, seed):
    pro, res = pair
    theta = torch.randn(n, 2, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    up = TIME_PROLONGATIONS.get(pro)(theta, n * r)
    assert up.shape == (n * r, 2, 3)
    back = TIME_RESTRICTIONS.get(res)(up, n)
    if res == "injection":
        assert torch.equal(back, theta)  # copies of the old samples: bit for bit
    else:
        torch.testing.assert_close(back, theta, rtol=4e-16, atol=4e-16)  # a mean of equal numbers: round-off


def test_linear_doubling_places_old_samples_at_even_steps():
    theta = torch.tensor([0.0, 2.0, 4.0])
    torch.testing.assert_close(prolong_linear(theta, 6), torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 4.0]))
    torch.testing.assert_close(prolong_constant(theta, 6), torch.tensor([0.0, 0.0, 2.0, 2.0, 4.0, 4.0]))
    # linear + average is not exact: it smooths
    assert not torch.equal(restrict_average(prolong_linear(theta, 6), 3), theta)
    with pytest.raises(MsnetError, match="must divide"):
        restrict_injection(theta, 2)


MOVES = [("prolong", "linear"), ("prolong", "constant"), ("restrict", "injection"), ("restrict", "average")]


@pytest.mark.parametrize("direction,op", MOVES)
def test_moved_network_agrees_with_its_source_to_first_order_in_h(direction, op):
    """For parameters smooth in t, a network moved in time (N -> 2N steps, or 2N -> N) and its source give
    logits that differ by O(h): fit the slope of log |logits_source - logits_moved| against log h, for every
    registered operator. Both networks discretise the same ODE; their classifier and opening are shared."""
    torch.manual_seed(0)
    C, T = 3, 2.0
    A, B = torch.randn(C, C, 3, 3, dtype=torch.float64) * 0.3, torch.randn(C, C, 3, 3, dtype=torch.float64) * 0.3
    a, b = torch.randn(C, dtype=torch.float64) * 0.1, torch.randn(C, dtype=torch.float64) * 0.1
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    diffs, hs = [], []
    for n in (8, 16, 32, 64):
        steps = n if direction == "prolong" else 2 * n
        spec = ModelSpec(1, 4, (8, 8), [StageSpec(C, steps, T)])
        torch.manual_seed(1)
        source = build_model(spec).double()
        t = source.time_grid(0).to(torch.float64)
        g = torch.Generator().manual_seed(2)  # the same opening and classifier for every n
        with torch.no_grad():
            source.blocks[0].params["K"].copy_(A + torch.sin(t).view(-1, 1, 1, 1, 1) * B)
            source.blocks[0].params["b"].copy_(a + torch.cos(t).view(-1, 1) * b)
            for p in [*source.opening.parameters(), *source.classifier.parameters()]:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        if direction == "prolong":
            moved = transfer_depth(source, 2 * n, prolongation=op)
        else:
            moved = transfer_depth(source, n, restriction=op)
        target = 2 * n if direction == "prolong" else n
        assert moved.depth() == [target] and moved.blocks[0].h == pytest.approx(T / target)
        with torch.no_grad():
            diffs.append((source(x) - moved(x)).norm().item())
        hs.append(T / n)
    slope = loglog_slope(hs, diffs)
    assert 0.8 < slope < 1.3, (slope, diffs)


def test_transfer_depth_moves_every_stage_and_refuses_non_per_step(monkeypatch):
    net = build_model(ModelSpec(1, 3, (8, 8), [StageSpec(2, 2, 1.0), StageSpec(4, 2, 1.0)]))
    deep = transfer_depth(net, 4)
    assert deep.depth() == [4, 4] and deep.spec.stages[1].layers == 4 and net.depth() == [2, 2]
    assert transfer_depth(deep, [2, 1]).depth() == [2, 1]
    monkeypatch.setattr(INTEGRATORS.get("euler"), "per_step_params", False)
    with pytest.raises(MsnetError, match="no per-step parameters to move in time"):
        transfer_depth(net, 4)


def test_depth_levels_and_errors(compose_cfg):
    cfg = compose_cfg("train", ["+depth=doubling"])
    assert depth_levels(cfg.depth) == [2, 4, 8, 16]
    assert [lv.layers for lv in build_schedule(cfg, (28, 28), 1)] == [2, 4, 8, 16]
    with pytest.raises(MsnetError, match="not depth.start=2 times a power of 2"):
        depth_levels(compose_cfg("train", ["+depth=doubling", "depth.stop=12"]).depth)
    with pytest.raises(MsnetError, match="depth.epochs needs 1 or 4 entries"):
        build_schedule(compose_cfg("train", ["+depth=doubling", "depth.epochs=[1,2]"]), (28, 28), 1)
    both = build_schedule(compose_cfg("train", ["+depth=doubling", "depth.stop=8", "+pyramid=2level"]), (28, 28), 1)
    assert [(lv.name, lv.layers) for lv in both] == [("coarse", 2), ("coarse", 4), ("coarse", 8), ("fine", 8)]


def test_depth_doubling_training(tiny_cfg, tmp_path):
    summary = train(tiny_cfg(["+depth=doubling", "depth.stop=8", "model.stages=2", "dataset.image_size=8"]), tmp_path / "run")
    assert [lv["layers"] for lv in summary["levels"]] == [2, 4, 8]
    assert summary["depth"] == [8, 8]
    assert [m["layers"] for m in read_metrics(tmp_path / "run")] == [[2, 2], [4, 4], [8, 8]]
    assert load_checkpoint(tmp_path / "run")["depth"] == [8, 8]
    assert summary["final_test_acc"] > 0.5


def test_depth_and_pyramid_compose(tiny_cfg, tmp_path):
    cfg = tiny_cfg(["+depth=doubling", "depth.stop=4", "+pyramid=2level", "dataset.image_size=16"])
    summary = train(cfg, tmp_path / "run")
    assert [(lv["level"], lv["resolution"], lv["layers"]) for lv in summary["levels"]] == [
        ("coarse", "8x8", 2), ("coarse", "8x8", 4), ("fine", "16x16", 4)]


def test_transfer_in_time_command(tiny_cfg, compose_cfg, tmp_path):
    train(tiny_cfg(["model.layers=2"]), tmp_path / "run")
    rows = transfer_checkpoint(compose_cfg("transfer", ["source_depth=2", "target_depth=4", f"ckpt={tmp_path / 'run'}",
                                                        "device=cpu"]), tmp_path / "t")
    assert [r["method"] for r in rows] == ["before", "after (linear)", "after (constant)"]
    # both prolongations are within O(h) of the source: loss within 5%, accuracy within 2 points (this small
    # network hides some wrong moves inside that, hence the exact check of the checkpoint below)
    for row in rows[1:]:
        assert row["val_loss"] == pytest.approx(rows[0]["val_loss"], rel=0.05), (row, rows[0])
        assert abs(row["val_acc"] - rows[0]["val_acc"]) <= 0.02
    moved = load_checkpoint(tmp_path / "t" / "checkpoints" / "transferred.pt")
    assert moved["depth"] == [4] and moved["model"]["blocks.0.params.K"].shape[0] == 4
    # the checkpoint holds the linear prolongation written out: theta_0, (theta_0 + theta_1) / 2, theta_1, theta_1
    source = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    for name, theta in source.items():
        if name.startswith("blocks.0.params."):
            want = torch.stack([theta[0], (theta[0] + theta[1]) / 2, theta[1], theta[1]])
            torch.testing.assert_close(moved["model"][name], want, rtol=0, atol=1e-7, msg=name)
        else:
            torch.testing.assert_close(moved["model"][name], theta, rtol=0, atol=0, msg=name)
    # the transferred network is a warm start for a 4-layer run
    s = train(tiny_cfg(["model.layers=4", "trainer.epochs=1", f"init={tmp_path / 't' / 'checkpoints' / 'transferred.pt'}"]), tmp_path / "warm")
    assert s["status"] == "completed"
    with pytest.raises(MsnetError, match="not --from-depth 3"):
        transfer_checkpoint(compose_cfg("transfer", ["source_depth=3", "target_depth=4", f"ckpt={tmp_path / 'run'}", "device=cpu"]))


def test_eval_at_start_records_each_levels_initial_guess(tiny_cfg, tmp_path):
    """The 4-layer level starts from the 2-layer network prolonged in time: within O(h) of it, so its first
    evaluation is where the 2-layer level ended (measured: loss 1.051 against 1.056, accuracy 71.0% against
    71.5%). A transfer that breaks the network moves the loss by far more than 5%."""
    train(tiny_cfg(["+depth=doubling", "depth.stop=4", "trainer.eval_at_start=true", "trainer.epochs=1"]), tmp_path / "r")
    metrics = read_metrics(tmp_path / "r")
    starts = [m for m in metrics if m["level_epoch"] == 0]
    assert [m["layers"] for m in starts] == [[2], [4]]
    assert all("train_loss" not in m for m in starts)
    shallow_end = [m for m in metrics if m["layers"] == [2]][-1]
    assert "train_loss" in shallow_end
    assert starts[1]["val_loss"] == pytest.approx(shallow_end["val_loss"], rel=0.05), (starts[1], shallow_end)
    assert abs(starts[1]["val_acc"] - shallow_end["val_acc"]) <= 0.02

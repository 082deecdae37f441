"""The time-smooth initialisation ``model.init_knots``: every stage's steps linear in t between K draws."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msnet import MsnetError
from msnet.core import ModelSpec, StageSpec, build_model
from msnet.multigrid.time import prolong_linear, restrict_injection, smooth_in_time_
from msnet.training import train
from msnet.core import resolve_device, resolve_dtype
from msnet.data import prepare_data
from msnet.training.schedule import build_schedule
from msnet.training.setup import check_config, model_spec
from msnet.training.state import RunState

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(layers: int, integrator: str = "euler", residual: str = "conv_act", seed: int = 0):
    torch.manual_seed(seed)
    spec = ModelSpec(in_channels=1, num_classes=3, image_size=(8, 8), stages=[StageSpec(2, layers), StageSpec(4, layers)],
                     integrator=integrator, residual=residual)
    return build_model(spec).double()


@settings(max_examples=25, deadline=None)
@given(knots=st.integers(1, 6), ratio=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_smoothed_steps_are_the_linear_interpolant_of_the_draws_at_the_knots(knots, ratio, seed):
    """After smoothing, restricting to the knots by injection gives back the original draws there (bit for bit),
    and prolonging those linearly gives back every step: the start lies in the range of the linear prolongation,
    so a coarse-in-time level with ``knots`` dividing its steps represents it exactly."""
    n = knots * ratio
    net = _net(n, seed=seed % 1000)
    drawn = [{k: v.detach().clone() for k, v in b.step_parameters().items()} for b in net.blocks]
    smooth_in_time_(net, knots)
    changed = False
    for block, before in zip(net.blocks, drawn):
        for name, value in block.step_parameters().items():
            at_knots = restrict_injection(value.detach(), knots)
            assert torch.equal(at_knots, before[name][::ratio])
            torch.testing.assert_close(prolong_linear(at_knots, n), value.detach(), rtol=0, atol=1e-15)
            changed = changed or not torch.equal(value.detach(), before[name])
    assert changed == (ratio > 1)  # the steps between the knots were independent draws (the biases start at 0)


def test_one_knot_makes_every_step_the_same_and_many_knots_change_nothing():
    net = _net(8)
    smooth_in_time_(net, 1)
    for block in net.blocks:
        for value in block.step_parameters().values():
            assert torch.equal(value, value[:1].expand_as(value))
    a, b = _net(8, seed=3), _net(8, seed=3)
    smooth_in_time_(b, 8)  # knots >= N: every step keeps its own draw
    smooth_in_time_(b, 16)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("integrator,residual", [("euler", "conv_act"), ("leapfrog", "conv_sym"),
                                                 ("hamiltonian", "hamiltonian")])
def test_no_step_becomes_less_stable(integrator, residual):
    """Convex combinations of the draws: no step's stability ratio exceeds the largest ratio of the draws."""
    net = _net(12, integrator, residual, seed=1)
    before = [b.step_ratios() for b in net.blocks]
    smooth_in_time_(net, 3)
    for block, r0 in zip(net.blocks, before):
        r1 = block.step_ratios()
        if r0 is None:
            assert r1 is None
        else:
            assert float(r1.max()) <= float(r0.max()) + 1e-9


def test_knots_must_divide_the_starting_depth(tiny_cfg):
    check_config(tiny_cfg(["model.layers=8", "model.init_knots=4"]))
    check_config(tiny_cfg(["model.layers=8", "model.init_knots=16"]))  # more knots than steps: independent draws
    with pytest.raises(MsnetError, match=r"init_knots=3 must divide the 8 steps .* model.init_knots=2"):
        check_config(tiny_cfg(["model.layers=8", "model.init_knots=3"]))
    with pytest.raises(MsnetError, match="at least 1"):
        check_config(tiny_cfg(["model.init_knots=0"]))
    # under +depth the network starts at depth.start steps
    with pytest.raises(MsnetError, match="must divide the 6 steps"):
        check_config(tiny_cfg(["model.layers=12", "+depth=doubling", "depth.start=6", "model.init_knots=4"]))


def test_a_run_starts_from_the_smooth_network_and_trains(tiny_cfg, tmp_path):
    """Through the trainer: the seeded start equals the independent start smoothed, and training from it runs."""
    cfg = tiny_cfg(["model.layers=8", "model.init_knots=2", "trainer.epochs=1"])
    data = prepare_data(cfg.dataset, resolve_device(cfg.device), resolve_dtype(cfg.dtype))
    spec = model_spec(cfg.model, data)
    smooth = RunState.start(cfg, spec, build_schedule(cfg, data.image_size, len(spec.stages)), torch.device("cpu"), torch.float32).model
    plain_cfg = tiny_cfg(["model.layers=8", "trainer.epochs=1"])
    plain = RunState.start(plain_cfg, model_spec(plain_cfg.model, data), build_schedule(plain_cfg, data.image_size, len(spec.stages)),
                           torch.device("cpu"), torch.float32).model
    smooth_in_time_(plain, 2)
    for a, b in zip(smooth.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed"

"""Data-fitted stencil transfer (msnet.multigrid.datafit): least-squares optimality, exactness, real data."""

from __future__ import annotations

import copy

import pytest
from hydra.errors import HydraException
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from msnet import MsnetError
from msnet.core import ModelSpec, StageSpec, build_model
from msnet.data import prepare_data
from msnet.multigrid import check_stencil_transfer, fit_transfer, get_transfer, level_data, transfer_resolution
from msnet.training import train
from msnet.training.evaluation import evaluate
from msnet.training.loop import train_epoch
from msnet.training.schedule import build_schedule, prolong_level
from msnet.training.setup import model_spec
from msnet.methods import build_update

from .conftest import needs_fashion

pytestmark = pytest.mark.usefixtures("one_thread")


def net(size=8, channels=3, layers=2, activation="tanh", residual="conv_act", seed=0):
    torch.manual_seed(seed)
    spec = ModelSpec(1, 4, (size, size), [StageSpec(channels, layers, 1.0)], activation=activation,
                     residual=residual)
    return build_model(spec).double()


def randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


@settings(max_examples=10, deadline=None)
@given(channels=st.integers(1, 4), finer=st.booleans(), seed=st.integers(0, 10_000))
def test_block_constant_images_keep_the_galerkin_opening(channels, finer, seed):
    """On fine images P x_H the block pair's Galerkin opening layer is exact (R K_h P = K_H, R P = I), so the
    least-squares fit, pulled towards it, returns it: to float64 round-off, in both directions."""
    coarse = randomise(net(size=6, channels=channels), seed)
    fine = transfer_resolution(coarse, 1, "constant")
    pair = get_transfer("constant")
    x_c = torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x_f = pair.prolong(x_c)
    source, target, xs, xt = (coarse, fine, x_c, x_f) if finer else (fine, transfer_resolution(fine, -1, "constant"),
                                                                    x_f, x_c)
    w0, b0 = target.opening.weight.clone(), target.opening.bias.clone()
    fit_transfer(source, target, xs, xt, "constant")
    assert torch.allclose(target.opening.weight, w0, atol=1e-9) and torch.allclose(target.opening.bias, b0, atol=1e-9)


@pytest.mark.parametrize("op", ["linear", "constant"])
@pytest.mark.parametrize("direction", ["finer", "coarser"])
def test_every_fitted_layer_solves_its_normal_equations(direction, op):
    """Each fitted stencil minimises its least-squares problem at its own inputs, written out here from the
    module docstring, not from the fit's code: going finer ||R(K y_h + b) - (K_H y_H + b_H)||^2, going coarser
    ||(K y_H + b) - R(K_h y_h + b_h)||^2, each + ridge * mean(diag(A^T A)) * ||(K, b) - Galerkin||^2. The
    gradient of that objective (autograd, float64) vanishes, and the objective is below the Galerkin one."""
    pair = get_transfer(op)
    g = torch.Generator().manual_seed(3)
    x_f = torch.rand(7, 1, 12, 12, generator=g, dtype=torch.float64)
    x_c = pair.restrict(x_f)

    def ident(t):
        return t

    if direction == "finer":
        source = randomise(net(size=6, layers=2))
        target = transfer_resolution(source, 1, op)
        x_s, x_t, on_target, on_source = x_c, x_f, pair.restrict, ident
    else:
        source = randomise(net(size=12, layers=2))
        target = transfer_resolution(source, -1, op)
        x_s, x_t, on_target, on_source = x_f, x_c, ident, pair.restrict
    galerkin = {k: v.clone() for k, v in target.state_dict().items()}
    galerkin_net = copy.deepcopy(target)
    ridge = 1e-3
    report = fit_transfer(source, target, x_s, x_t, op, ridge)

    def mismatch(tgt):  # ||R y_h(T) - y_H(T)|| / ||y_H(T)||, the report's definition, from the features here
        with torch.no_grad():
            fine, coarse = (tgt.features(x_t), source.features(x_s)) if direction == "finer" else \
                (source.features(x_s), tgt.features(x_t))
        return float((pair.restrict(fine) - coarse).norm() / coarse.norm())

    assert report.mismatch_galerkin == pytest.approx(mismatch(galerkin_net), rel=1e-10)
    assert report.mismatch_fit == pytest.approx(mismatch(target), rel=1e-10)
    assert report.images == 7 and report.stencils == 1 + 2
    # each layer's inputs: both networks' own states (the target's with its fitted layers)
    y_s, y_t = x_s, x_t
    act, h = source.activation, source.blocks[0].h
    layers = [("opening.weight", "opening.bias", None)] + [(None, None, j) for j in range(2)]
    for wname, bname, j in layers:
        if j is None:
            ws, bs, wt, bt = source.opening.weight, source.opening.bias, target.opening.weight, target.opening.bias
            w0, b0 = galerkin[wname], galerkin[bname]
        else:
            ps, pt = source.blocks[0].params, target.blocks[0].params
            ws, bs, wt, bt = ps["K"][j], ps["b"][j], pt["K"][j], pt["b"][j]
            w0, b0 = galerkin["blocks.0.params.K"][j], galerkin["blocks.0.params.b"][j]
        pre_s = F.conv2d(y_s, ws, bs, padding=1)
        z = on_source(pre_s)
        n, _, hh, ww = y_t.shape
        cols = torch.cat([F.unfold(y_t, 3, padding=1).reshape(n, -1, hh, ww),
                          torch.ones(n, 1, hh, ww, dtype=torch.float64)], 1)
        scale = ridge * on_target(cols).pow(2).sum(dim=(0, 2, 3)).mean()  # ridge * mean diag(A^T A)

        def objective(w, b):
            data = (on_target(F.conv2d(y_t, w, b, padding=1)) - z).pow(2).sum()
            return data + scale * ((w - w0).pow(2).sum() + (b - b0).pow(2).sum())

        w = wt.detach().clone().requires_grad_()
        b = bt.detach().clone().requires_grad_()
        value = objective(w, b)
        gw, gb = torch.autograd.grad(value, (w, b))
        assert torch.cat([gw.flatten(), gb]).norm() < 1e-8 * (1 + value.item())
        assert value.item() <= objective(w0, b0).item()
        with torch.no_grad():
            pre_t = F.conv2d(y_t, wt, bt, padding=1)
            if j is None:
                y_s, y_t = act(pre_s), act(pre_t)
            else:
                y_s, y_t = y_s + h * act(pre_s), y_t + h * act(pre_t)


def test_unsupported_models_and_settings_fail_in_one_line(compose_cfg, tiny_cfg, tmp_path):
    model = net(channels=4, residual="preact_basic")
    with pytest.raises(MsnetError, match="needs model.residual=conv_act"):
        fit_transfer(model, transfer_resolution(model, 1, "constant"), torch.rand(2, 1, 8, 8).double(),
                     torch.rand(2, 1, 16, 16).double(), "constant")
    # in training it fails at start, before any coarse epoch, naming the key to change
    cfg = tiny_cfg(["dataset.image_size=16", "+pyramid=2level_block", "model.residual=preact_basic"])
    with pytest.raises(MsnetError, match="use pyramid.stencils=galerkin for this model") as err:
        train(cfg, tmp_path / "run")
    assert "\n" not in str(err.value) and not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(MsnetError, match="pyramid.fit_images must be at least 1"):
        build_schedule(compose_cfg("train", ["+pyramid=2level_block", "pyramid.fit_images=0"]), (28, 28), 1)
    with pytest.raises(HydraException) as err:  # a closed choice: refused when the config is composed
        compose_cfg("train", ["+pyramid=2level_block", "pyramid.stencils=exact"])
    assert "expected one of [galerkin, fit]" in f"{err.value} {err.value.__cause__}"
    with pytest.raises(MsnetError, match="unknown stencil transfer 'exact'; choose one of: galerkin, fit"):
        check_stencil_transfer("exact")  # the library's own check, for callers without a schema


def test_fit_runs_through_the_trainer_and_is_recorded(tiny_cfg, tmp_path):
    """+pyramid=2level_block fits its stencils at the prolongation and says so in summary.json."""
    cfg = tiny_cfg(["dataset.image_size=16", "+pyramid=2level_block", "pyramid.epochs=[1,1]", "pyramid.fit_images=64"])
    assert cfg.pyramid.stencils == "fit"
    summary = train(cfg, tmp_path / "run")
    fine = summary["levels"][-1]
    fit = fine["stencil_fit"]
    assert fine["level"] == "fine" and fit["images"] == 64 and fit["stencils"] == 1 + 2
    assert fit["mismatch_fit"] < fit["mismatch_galerkin"]
    assert "stencil_fit" not in summary["levels"][0]


@needs_fashion
@pytest.mark.parametrize("op,sigma", [("constant", 0.0), ("linear", 1.0)])
def test_fit_recovers_most_of_the_prolongation_drop_on_fashion_mnist(fashion_cfg, op, sigma):
    """A net trained on 14x14 Fashion-MNIST, prolonged to 28x28: the Galerkin stencils lose accuracy, the fitted
    ones (256 training images) keep most of it, and they agree better with the coarse net on the coarse grid."""
    cfg = fashion_cfg(["dataset.train_subset=6000", "model.layers=4", "+pyramid=2level", f"pyramid.operator={op}",
                       f"pyramid.sigma={sigma}", "pyramid.stencils=fit"])
    data = prepare_data(cfg.dataset, torch.device("cpu"), torch.float32)
    torch.manual_seed(1)
    coarse = transfer_resolution(build_model(model_spec(cfg.model, data)), -1, op)
    d = level_data(data, 1, op, sigma)
    update = build_update(coarse, cfg, cfg.optimizer, 8, None)  # trained long enough for Galerkin to lose 3-8 points
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        train_epoch(coarse, update, d.x_train, d.y_train, 128, g)
        update.end_epoch()
    acc_coarse = evaluate(coarse, d.x_val, d.y_val)["acc"]
    acc_galerkin = evaluate(transfer_resolution(coarse, 1, op), data.x_val, data.y_val)["acc"]
    fitted, report = prolong_level(coarse, d, data, 1, cfg.pyramid, 0)
    acc_fit = evaluate(fitted, data.x_val, data.y_val)["acc"]
    assert report.images == 256 and report.mismatch_fit < report.mismatch_galerkin
    assert acc_fit > acc_galerkin + 0.02, (acc_coarse, acc_galerkin, acc_fit)
    assert acc_fit > acc_coarse - 0.015, (acc_coarse, acc_galerkin, acc_fit)


def test_the_block_pairs_galerkin_prolongation_oscillates():
    """The module docstring's example: the box stencil prolongs to [[4,-2,4],[-2,1,-2],[4,-2,4]], gain 25 on the
    checkerboard against the box's 1, which is what the fit trades against data consistency."""
    from msnet.multigrid import prolong_stencil

    box = torch.ones(3, 3, dtype=torch.float64)
    fine = prolong_stencil(box, "constant")
    assert torch.allclose(fine, torch.tensor([[4.0, -2, 4], [-2, 1, -2], [4, -2, 4]], dtype=torch.float64), atol=1e-12)
    checker = torch.tensor([[1.0, -1, 1], [-1, 1, -1], [1, -1, 1]], dtype=torch.float64)
    assert (fine * checker).sum().item() == pytest.approx(25.0) and (box * checker).sum().item() == pytest.approx(1.0)

"""Network transfer between resolutions and coarse-to-fine (pyramid) training."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.errors import ConfigCompositionException

from msnet import MsnetError
from msnet.core import ModelSpec, StageSpec, build_model
from msnet.multigrid import TRANSFERS, get_transfer, restrict_images, transfer_resolution
from msnet.multigrid.space import prolong_stencil, restrict_stencil
from msnet.runs import load_checkpoint, read_metrics
from msnet.training import train
from msnet.methods.regularizers import build_regularizer, classifier_smoothness, time_smoothness
from msnet.multigrid import parse_level
from msnet.training.schedule import build_schedule

from .conftest import strip_times

OPS = TRANSFERS.names()


def net(size=16, stages=1, classifier="full_field", activation="tanh", layers=3):
    torch.manual_seed(0)
    spec = ModelSpec(1, 5, (size, size), [StageSpec(3 * 2**i, layers, 1.0) for i in range(stages)],
                     classifier=classifier, activation=activation)
    return build_model(spec).double()


def randomise_classifier(model, seed=1):
    """Random classifier weights and a nonzero mu (mu starts at 0, which would hide whether it moves)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def repeat(f, times):
    """x -> f(f(...f(x))), ``times`` times (an image operator over several levels)."""

    def g(x):
        for _ in range(times):
            x = f(x)
        return x

    return g


@pytest.mark.parametrize("stages,classifier", [(1, "full_field"), (2, "full_field"), (2, "gap")])
def test_network_round_trip_moves_every_stencil(stages, classifier):
    """fine -> coarse -> fine: stencils by the Galerkin map and back exactly, everything else unchanged,
    and the classifier's W as an image, R W going down and P R W coming back (GAP: unchanged)."""
    fine = randomise_classifier(net(16, stages, classifier))
    coarse = transfer_resolution(fine, -1)
    assert coarse.spec.image_size == (8, 8) and fine.spec.image_size == (16, 16)
    for (name, a), (_, b) in zip(fine.state_dict().items(), coarse.state_dict().items()):
        if a.shape[-2:] == (3, 3) and not name.startswith("classifier"):
            torch.testing.assert_close(b, restrict_stencil(a), rtol=0, atol=0)
        elif name != "classifier.V":
            torch.testing.assert_close(b, a, rtol=0, atol=0)  # biases, 1x1 connectives, mu, GAP's layer
    back = transfer_resolution(coarse, +1)
    for name, a in fine.state_dict().items():
        if name != "classifier.V":
            torch.testing.assert_close(back.state_dict()[name], a, rtol=0, atol=1e-12)
    if classifier == "full_field":
        pair, W = get_transfer("linear"), fine.classifier.field_weights
        torch.testing.assert_close(coarse.classifier.field_weights, pair.restrict(W), rtol=0, atol=1e-12)
        torch.testing.assert_close(back.classifier.field_weights, pair.prolong(pair.restrict(W)), rtol=0, atol=1e-12)
    assert coarse(torch.randn(2, 1, 8, 8, dtype=torch.float64)).shape == (2, 5)


@pytest.mark.parametrize("classifier", ["full_field", "gap"])
@pytest.mark.parametrize("op", OPS)
def test_full_round_trip_coarse_fine_coarse_includes_the_classifier(op, classifier):
    """coarse -> fine -> coarse gives back every tensor, classifier included, to round-off: stencils because
    the map is inverted exactly, W because R P = I for the constant pair. For the linear pair R P is a
    smoother, so W comes back as R P W (and that is measurably not W)."""
    coarse = randomise_classifier(net(8, 2, classifier))
    back = transfer_resolution(transfer_resolution(coarse, +1, op), -1, op)
    assert back.spec == coarse.spec
    pair = get_transfer(op)
    for name, a in coarse.state_dict().items():
        if name == "classifier.V" and not TRANSFERS.get(op).rp_identity:
            W = coarse.classifier.field_weights
            torch.testing.assert_close(back.classifier.field_weights, pair.restrict(pair.prolong(W)), rtol=0, atol=1e-12)
            assert (back.classifier.field_weights - W).abs().max() > 1e-2
        else:
            torch.testing.assert_close(back.state_dict()[name], a, rtol=0, atol=1e-11, msg=name)


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("op", OPS)
def test_full_field_classifier_keeps_the_inner_product_both_ways(op, levels):
    """h^d W^T y is one L2 inner product on every grid (R = P^T / 4, h_H^d = 4 h_h^d), to round-off:
    prolonged, fine.classifier(y_h) == coarse.classifier(R y_h) for every fine y_h; restricted,
    coarse.classifier(y_H) == fine.classifier(P y_H). A classifier off by h^d (a positive scale argmax
    cannot see), a wrong sign or a lost mu is off by O(1) here."""
    pair = get_transfer(op)
    R, P = repeat(pair.restrict, levels), repeat(pair.prolong, levels)
    g = torch.Generator().manual_seed(2)
    coarse = randomise_classifier(net(8))
    fine = transfer_resolution(coarse, levels, op)
    y_h = torch.randn(4, 3, 8 * 2**levels, 8 * 2**levels, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fine.classifier(y_h), coarse.classifier(R(y_h)), rtol=0, atol=1e-12)
    fine = randomise_classifier(net(16))
    coarse = transfer_resolution(fine, -levels, op)
    y_H = torch.randn(4, 3, 16 >> levels, 16 >> levels, generator=g, dtype=torch.float64)
    torch.testing.assert_close(coarse.classifier(y_H), fine.classifier(P(y_H)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
def test_two_level_transfer_is_galerkin_from_grid_to_grid(op):
    """Every stencil of a network moved two levels obeys R R K_h P P y = K_H y away from the boundary
    (conv2d itself, not the stencil map), both ways: the map is applied once per level."""
    pair = get_transfer(op)
    R, P = repeat(pair.restrict, 2), repeat(pair.prolong, 2)
    g = torch.Generator().manual_seed(4)
    coarse = net(8)
    fine = transfer_resolution(coarse, 2, op)
    down = transfer_resolution(fine, -2, op)
    interior = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    for c_net, f_net in ((coarse, fine), (down, fine)):
        pairs = [(c_net.opening.weight, f_net.opening.weight)]
        pairs += list(zip(c_net.blocks[0].params["K"], f_net.blocks[0].params["K"]))
        for K_H, K_h in pairs:
            y = torch.randn(2, K_H.shape[1], 8, 8, generator=g, dtype=torch.float64)
            lhs = R(torch.nn.functional.conv2d(P(y), K_h, padding=1))
            rhs = torch.nn.functional.conv2d(y, K_H, padding=1)
            torch.testing.assert_close(lhs[interior], rhs[interior], rtol=0, atol=1e-11)


POINTWISE = [("euler", 1, 1, "full_field"), ("rk4", 1, 1, "full_field"), ("lm", 1, 1, "full_field"),
             ("euler", 1, 2, "full_field"), ("euler", 2, 1, "full_field"), ("lm", 2, 2, "gap")]


@pytest.mark.parametrize("integrator,stages,levels,classifier", POINTWISE)
def test_pointwise_network_moves_exactly_with_the_constant_pair(integrator, stages, levels, classifier):
    """A whole network against its transfer, on data where the transfer is exact.

    With the constant pair, stencils that have only a centre entry act pixel by pixel: they commute with
    P (copies into 2x2 blocks) and keep their values under stencil transfer, and so do tanh, biases, 1x1
    connectives and 2x2 pooling. So the network moved ``levels`` levels up gives, on P x, the source's
    logits on x, and a network moved down gives on x what its source gives on P x: to round-off, through
    the opening layer, every step (Euler, RK4, LM with its k_n), the stages, the classifier's W (P / R) and
    mu. With two stages the images are block-constant on the last stage's grid, so the pooled states are too.
    """
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)

    def pointwise(size):
        spec = ModelSpec(2, 5, (size, size), [StageSpec(3 + s, 3, 1.0) for s in range(stages)],
                         integrator=integrator, classifier=classifier)
        model = build_model(spec).double()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.1 if name.endswith(".k") else 0.7))
                if p.shape[-2:] == (3, 3) and not name.startswith("classifier."):
                    centre = p[..., 1, 1].clone()
                    p.zero_()
                    p[..., 1, 1] = centre
        return model

    pair = get_transfer("constant")
    P = repeat(pair.prolong, levels)
    side = 8 >> (stages - 1)
    x = repeat(pair.prolong, stages - 1)(torch.randn(4, 2, side, side, generator=g, dtype=torch.float64))
    coarse = pointwise(8)
    logits = coarse(x)
    assert (logits - logits.mean(0)).abs().max() > 0.1  # not a trivial comparison
    torch.testing.assert_close(transfer_resolution(coarse, levels, "constant")(P(x)), logits, rtol=0, atol=1e-12)
    fine = pointwise(8 * 2**levels)
    torch.testing.assert_close(transfer_resolution(fine, -levels, "constant")(x), fine(P(x)), rtol=0, atol=1e-12)


def test_linear_block_commutes_with_transfer_for_the_constant_pair():
    """One linear Euler step: R Phi_h(P y) = Phi_H(y) exactly when R P = I (piecewise-constant pair)."""
    fine = net(16, activation="identity", layers=1)
    coarse = transfer_resolution(fine, -1, op="constant")
    op = get_transfer("constant")
    y = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(op.restrict(fine.blocks[0](op.prolong(y))), coarse.blocks[0](y), rtol=0, atol=1e-12)


def test_too_deep_transfer_is_one_line():
    with pytest.raises(MsnetError, match="divisible by 8"):
        transfer_resolution(net(12, stages=2), -2)


def test_restrict_images():
    x = torch.randn(2, 1, 28, 28)
    assert restrict_images(x, 2).shape == (2, 1, 7, 7)
    torch.testing.assert_close(restrict_images(x, 1, sigma=0), get_transfer("linear").restrict(x))
    # smoothing keeps constants
    torch.testing.assert_close(restrict_images(torch.ones(1, 1, 8, 8), 1)[..., 1:-1, 1:-1], torch.ones(1, 1, 2, 2))


def test_levels_parse(compose_cfg):
    assert parse_level("fine", (28, 28)) == 0 and parse_level("coarse", (28, 28)) == 1
    assert parse_level("7", (28, 28)) == 2
    with pytest.raises(MsnetError, match="no level of 28x28 images is 10 pixels"):
        parse_level("10", (28, 28))
    cfg = compose_cfg("train", ["+pyramid=3level"])
    assert [(lv.name, lv.down) for lv in build_schedule(cfg, (28, 28), 1)] == [("coarser", 2), ("coarse", 1), ("fine", 0)]
    with pytest.raises(MsnetError, match="pyramid.levels=3 is too deep for 28x28 images with 3 stage") as err:
        build_schedule(compose_cfg("train", ["+pyramid=3level", "model=resnet3"]), (28, 28), 3)
    assert "use pyramid.levels=1 or fewer" in str(err.value)
    with pytest.raises(MsnetError, match="pyramid.epochs needs 2 entries"):
        build_schedule(compose_cfg("train", ["+pyramid=2level", "pyramid.epochs=[1]"]), (28, 28), 1)


def test_pyramid_forms_users_type(compose_cfg):
    assert compose_cfg("train", ["+pyramid=2level"]).pyramid.levels == 2
    assert compose_cfg("train").get("pyramid") is None
    with pytest.raises(ConfigCompositionException, match=r"\+pyramid=2level"):
        compose_cfg("train", ["pyramid=2level"])
    exp = compose_cfg("train", ["experiment=pyramid_fashion"])
    assert exp.pyramid.levels == 2
    assert compose_cfg("train", ["experiment=pyramid_fashion", "pyramid=3level"]).pyramid.levels == 3


def test_pyramid_training_runs_coarse_to_fine(tiny_cfg, tmp_path):
    cfg = tiny_cfg(["dataset.image_size=16", "+pyramid=2level", "pyramid.epochs=[2,1]", "trainer.eval_at_start=true"])
    summary = train(cfg, tmp_path / "run")
    assert [lv["level"] for lv in summary["levels"]] == ["coarse", "fine"]
    assert [lv["resolution"] for lv in summary["levels"]] == ["8x8", "16x16"]
    metrics = read_metrics(tmp_path / "run")
    trained = [m for m in metrics if "train_loss" in m]
    assert [(m["level"], m["resolution"]) for m in trained] == [("coarse", [8, 8]), ("coarse", [8, 8]), ("fine", [16, 16])]
    # The prolonged network, before any fine epoch, is the coarse one on finer (smooth) images: it starts where
    # the coarse level ended (measured: loss 0.838 against 0.856, accuracy 99.0% against 99.5%). A classifier
    # off by a scale or a sign, or stencils moved wrongly, moves the loss by far more than 10%.
    coarse_end = [m for m in metrics if m["level"] == "coarse"][-1]
    fine_start = next(m for m in metrics if m["level"] == "fine" and m["level_epoch"] == 0)
    assert "train_loss" not in fine_start
    assert fine_start["val_loss"] == pytest.approx(coarse_end["val_loss"], rel=0.1), (fine_start, coarse_end)
    assert fine_start["val_acc"] >= coarse_end["val_acc"] - 0.05
    ck = load_checkpoint(tmp_path / "run")
    assert ck["resolution"] == [16, 16] and ck["level"] == "fine" and ck["model_spec"]["image_size"] == [16, 16]
    assert summary["final_test_acc"] > 0.5  # 4 classes
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["levels"][0]["test_acc"] is not None
    assert "levels" in (tmp_path / "run" / "console.txt").read_text()


def test_block_pyramid_trains_on_block_averages(compose_cfg, tiny_cfg, tmp_path):
    """+pyramid=2level_block: coarse images are exactly the 2x2 block averages, the identity stencil moves unchanged."""
    cfg = compose_cfg("train", ["+pyramid=2level_block"])
    assert (cfg.pyramid.operator, cfg.pyramid.sigma, list(cfg.pyramid.epochs)) == ("constant", 0.0, [5, 5])
    assert (cfg.pyramid.stencils, list(cfg.pyramid.lr)) == ("fit", [None, 5e-4])
    # a null entry keeps optimizer.lr on that level
    assert [lv.lr for lv in build_schedule(cfg, (28, 28), 1)] == [None, 5e-4]
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    coarse = restrict_images(x, 1, cfg.pyramid.operator, cfg.pyramid.sigma)
    assert torch.allclose(coarse, x.view(3, 1, 8, 2, 8, 2).mean(dim=(3, 5)), rtol=0, atol=1e-15)
    # a coarse identity stencil prolongs to the identity (the linear pair's prolongation sharpens)
    ident = torch.zeros(3, 3, dtype=torch.float64)
    ident[1, 1] = 1.0
    assert torch.allclose(prolong_stencil(ident, cfg.pyramid.operator), ident, atol=1e-12)
    run = tiny_cfg(["dataset.image_size=16", "+pyramid=2level_block", "pyramid.epochs=[1,1]"])
    summary = train(run, tmp_path / "run")
    assert [(lv["level"], lv["resolution"]) for lv in summary["levels"]] == [("coarse", "8x8"), ("fine", "16x16")]
    assert summary["final_test_acc"] > 0.5  # 4 classes
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run") if "lr" in r]
    assert lrs == [run.optimizer.lr, 5e-4]  # each level's first (and only) epoch


def test_pyramid_resume_across_a_level_boundary(tiny_cfg, tmp_path, cut_and_resume):
    over = ["dataset.image_size=16", "+pyramid=2level", "pyramid.epochs=[2,2]"]
    train(tiny_cfg(over), tmp_path / "full")
    cut, _ = cut_and_resume(over, 3)  # Ctrl-C in the first epoch of the fine level
    assert cut["level"] == "coarse"
    assert strip_times(read_metrics(tmp_path / "resumed")) == strip_times(read_metrics(tmp_path / "full"))


def test_train_at_a_coarse_level(tiny_cfg, tmp_path):
    summary = train(tiny_cfg(["dataset.image_size=16", "level=coarse"]), tmp_path / "run")
    assert summary["resolution"] == [8, 8] and summary["level"] == "coarse"
    with pytest.raises(MsnetError, match="too deep"):
        train(tiny_cfg(["dataset.image_size=16", "level=down4"]), tmp_path / "deep")


def test_regularizers():
    model = net(8)
    with torch.no_grad():
        model.classifier.set_field_weights(torch.ones(5, 3, 8, 8, dtype=torch.float64))
        for p in model.blocks[0].step_parameters().values():
            p.copy_(p[:1].expand_as(p))
    assert classifier_smoothness(model).item() == 0 and time_smoothness(model).item() == 0
    with torch.no_grad():
        ramp = torch.arange(8, dtype=torch.float64).view(1, 1, 8, 1).expand(5, 3, 8, 8)
        model.classifier.set_field_weights(ramp.clone())
    # 7 unit differences per column, 8 columns, 15 (class, channel) pairs
    assert classifier_smoothness(model).item() == pytest.approx(7 * 8 * 15)
    from omegaconf import OmegaConf

    pen = build_regularizer(model, OmegaConf.create({"classifier_smoothness": 0.5, "stencil_smoothness": 1.0}))
    value = pen()
    value.backward()
    assert value.item() == pytest.approx(0.5 * 7 * 8 * 15)
    assert model.classifier.V.grad is not None
    with pytest.raises(MsnetError, match="full_field"):
        build_regularizer(net(8, classifier="gap"), OmegaConf.create({"classifier_smoothness": 1.0, "stencil_smoothness": 0.0}))


def test_training_with_regularizers(tiny_cfg, tmp_path):
    s = train(tiny_cfg(["regularizer.classifier_smoothness=1e-3", "regularizer.stencil_smoothness=1e-2"]), tmp_path / "r")
    assert s["status"] == "completed" and s["final_test_acc"] > 0.4

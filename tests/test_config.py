"""Configs: the real ones compose, with and without overrides; bad overrides fail at composition."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import ConfigKeyError, ValidationError

from msnet import MsnetError
from msnet.training.setup import check_config, override_keys, resumed_config

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["dataset", "model", "optimizer", "trainer", "experiment"]


def test_default_composes(compose_cfg):
    cfg = compose_cfg("train")
    assert cfg.dataset.name == "fashion_mnist"
    assert cfg.model.integrator == "euler" and cfg.model.classifier == "full_field"
    assert isinstance(cfg.seed, int)
    check_config(cfg)


def test_overrides_compose(compose_cfg):
    cfg = compose_cfg("train", ["model.layers=8", "optimizer=sgd", "optimizer.lr=0.1", "dataset=mnist"])
    assert cfg.model.layers == 8 and cfg.optimizer.name == "sgd" and cfg.optimizer.lr == 0.1
    assert cfg.dataset.name == "mnist"


@pytest.mark.parametrize(
    "group,option",
    [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))],
)
def test_every_group_option_composes(compose_cfg, group, option):
    cfg = compose_cfg("train", [f"{group}={option}"])
    check_config(cfg)


@pytest.mark.parametrize(
    "override,error",
    [
        ("model.layers=abc", (ValidationError, HydraException)),
        ("model.nonexistent=1", (ConfigKeyError, HydraException)),
        ("dataset=nope", ConfigCompositionException),
        ("optimizer=nope", ConfigCompositionException),
        ("trainer.epochs=1.5", (ValidationError, HydraException)),
    ],
)
def test_bad_overrides_fail_at_composition(compose_cfg, override, error):
    with pytest.raises(error):
        compose_cfg("train", [override])


@pytest.mark.parametrize(
    "name,override,line",
    [
        ("train", "optimizer.lr=abc", "optimizer.lr=abc: optimizer.lr takes a number, e.g. optimizer.lr="),
        ("train", "seed=null", "seed=null: seed takes an integer, e.g. seed="),
        ("train", "trainer.epochs=1.5", "trainer.epochs=1.5: trainer.epochs takes an integer, e.g. trainer.epochs="),
        ("train", "model.backprop=foo", "model.backprop=foo: model.backprop takes one of store, reversible, e.g. "),
        ("train", "trainer.progress=maybe", "trainer.progress=maybe: trainer.progress takes true or false, e.g. "),
        ("train", "dataset.train_subset=x", "dataset.train_subset=x: dataset.train_subset takes an integer or null"),
        ("train", "model.layres=3", "model.layres=3: model has no key 'layres'; did you mean layers?"),
        ("evaluate", "batch_size=big", "batch_size=big: batch_size takes an integer, e.g. batch_size="),
        ("transfer", "sigma=wide", "sigma=wide: sigma takes a number, e.g. sigma="),
    ],
)
def test_wrong_types_are_one_line_naming_key_value_and_type(compose_cfg, name, override, line):
    """What ``msnet`` prints for an override the schema refuses (msnet.commands.type_error_line)."""
    from msnet.commands import type_error_line

    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(name, [override])
    got = type_error_line(err.value)
    assert got is not None and got.startswith(line), got
    assert "\n" not in got
    key = override.split("=")[0]
    example = got.partition(", e.g. ")[2]
    if example:  # the example is a value the key takes: it composes
        assert example.startswith(key + "=")
        compose_cfg(name, [example])


def test_other_composition_errors_keep_hydras_report(compose_cfg):
    from msnet.commands import type_error_line

    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("train", ["dataset=imagenet"])
    assert type_error_line(err.value) == ("dataset=imagenet: the group dataset has no option 'imagenet'; "
                                          "choose one of cifar10, fashion_mnist, mnist, npz, synthetic")
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("train", ["pyramid=2level"])
    assert type_error_line(err.value) == ("pyramid=2level: pyramid is not in the defaults list; "
                                          "add it with a plus: +pyramid=2level")
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("train", ["optimizer=sgdd"])
    assert "bcd_schema" not in type_error_line(err.value) and "choose one of adam, adamw, bcd, sgd" in type_error_line(err.value)
    assert type_error_line(ConfigCompositionException("something else went wrong")) is None


@pytest.mark.parametrize(
    "override,match",
    [
        ("model.integrator=nope", "unknown integrator 'nope'; choose one of"),
        ("model.activation=nope", "unknown activation"),
        ("dataset.name=nope", "unknown dataset 'nope'"),
        ("optimizer.name=nope", "unknown optimizer"),
        ("trainer.epochs=0", "trainer.epochs must be at least 1"),
    ],
)
def test_bad_values_fail_early_with_one_line(compose_cfg, override, match):
    cfg = compose_cfg("train", [override])
    with pytest.raises(MsnetError, match=match) as err:
        check_config(cfg)
    assert "\n" not in str(err.value)


def test_resumed_config_takes_only_overridden_keys(compose_cfg):
    saved = compose_cfg("train", ["model.layers=2", "trainer.epochs=3"])
    current = compose_cfg("train", ["trainer.epochs=5", "optimizer=sgd", "resume=/x.pt"])
    from omegaconf import OmegaConf

    merged = resumed_config(OmegaConf.to_container(saved), current, ["trainer.epochs=5", "optimizer=sgd", "resume=/x.pt"])
    assert merged.trainer.epochs == 5
    assert merged.model.layers == 2  # from the checkpoint
    assert merged.optimizer.name == "sgd" and merged.optimizer.lr == 0.1  # the whole group replaced
    assert merged.resume == "/x.pt"
    assert override_keys(["+pyramid=2level", "~x", "hydra.run.dir=a"]) == ["pyramid", "x"]


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["optimizer.lr=-1"], r"^optimizer.lr must be positive, got -1"),
        (["optimizer.weight_decay=-0.1"], r"^optimizer.weight_decay must be >= 0"),
        (["optimizer=bcd", "optimizer.cg_iters=0"], r"^optimizer.cg_iters must be >= 1"),
        (["optimizer=bcd", "optimizer.scheduler=cosine"], r"^optimizer=bcd chooses its step length by line search"),
        (["trainer=mgopt", "trainer.armijo_c1=2"], r"^trainer.armijo_c1 must be in \(0, 1\)"),
        (["trainer=mgopt", "optimizer=bcd"], r"^trainer=mgopt smooths with a torch.optim optimiser, not optimizer=bcd"),
        (["optimizer.name=mgopt"], r"^unknown optimizer 'mgopt'"),  # mgopt is chosen with trainer=, not optimizer=
        (["threads=0"], r"^threads must be at least 1"),
    ],
)
def test_bad_values_fail_in_preflight_before_data_is_loaded(tiny_cfg, tmp_path, monkeypatch, overrides, match):
    """Every check that needs no data runs before the dataset is read (and before anything is written)."""
    from msnet.training import api

    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the config was checked")

    monkeypatch.setattr(api, "prepare_data", no_data)
    with pytest.raises(MsnetError, match=match) as err:
        api.train(tiny_cfg(overrides), tmp_path / "run")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("overrides,valid", [
    (["optimizer.scheduler=cosin"], "constant, cosine, step"),
    (["trainer.precision=fp16"], "fp32, bf16"),
    (["dtype=float16"], "float32, float64"),
    (["model.backprop=stored"], "store, reversible"),
    (["model.connective=pool"], "conv, pad"),
    (["+pyramid=2level", "pyramid.stencils=fitted"], "galerkin, fit"),
    (["trainer=mgopt", "trainer.cycle=X"], "V, W"),
    (["trainer=mgopt", "trainer.line_search=wolfe"], "none, armijo"),
    (["trainer=mgopt", "trainer.gradient_restriction=sum"], "transpose, scaled"),
])
def test_closed_choices_fail_at_composition_with_the_valid_values(compose_cfg, overrides, valid):
    with pytest.raises(HydraException) as err:
        compose_cfg("train", overrides)
    assert f"expected one of [{valid}]" in f"{err.value} {err.value.__cause__}"


def test_transfer_choices_fail_at_composition(compose_cfg):
    with pytest.raises(HydraException) as err:
        compose_cfg("transfer", ["stencils=bogus"])
    assert "expected one of [galerkin, fit]" in f"{err.value} {err.value.__cause__}"


def test_each_option_declares_only_its_own_settings(compose_cfg):
    """A plain run's config holds no BCD, MG/OPT or RMTR keys; their presets hold theirs, typed by their schemas."""
    plain = compose_cfg("train")
    assert "cycle" not in plain.trainer and "nu1" not in plain.trainer and "cg_iters" not in plain.optimizer
    mg = compose_cfg("train", ["trainer=mgopt"])
    assert mg.trainer.cycle == "V" and mg.trainer.epochs == plain.trainer.epochs and "precision" in mg.trainer
    assert "memory" not in plain.trainer and "radius" not in mg.trainer
    rmtr = compose_cfg("train", ["trainer=rmtr"])
    assert rmtr.trainer.memory == 5 and rmtr.trainer.batch_size == plain.trainer.batch_size and "cycle" not in rmtr.trainer
    bcd = compose_cfg("train", ["optimizer=bcd"])
    assert bcd.optimizer.cg_iters == 10 and bcd.optimizer.scheduler == "constant"
    with pytest.raises(HydraException):
        compose_cfg("train", ["trainer.nu1=2"])  # a plain run has no MG/OPT key to set


def test_a_key_of_an_optional_group_that_is_off_is_one_line(compose_cfg):
    """depth.sizing=cost without +depth=...: OmegaConf cannot set a key under the group's null (Hydra asserts);
    the line says to select the group first, and a selected group takes the key."""
    from msnet.commands import unselected_group_line

    with pytest.raises(AssertionError) as err:
        compose_cfg("train", ["depth.sizing=cost"])
    assert unselected_group_line(err.value, ["depth.sizing=cost"]) == (
        "depth.sizing=cost: the group depth is off, so its keys cannot be set; select it first, "
        "e.g. +depth=doubling depth.sizing=cost")
    assert unselected_group_line(err.value, ["+depth=doubling", "seed=1"]) is None  # no key under an off group
    assert unselected_group_line(AssertionError("other"), ["depth.sizing=cost"]) is None
    assert compose_cfg("train", ["+depth=doubling", "depth.sizing=cost"]).depth.sizing.name == "cost"

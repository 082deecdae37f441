"""From config to objects: the preflight checks, seeding, model spec, resumed configs."""

from __future__ import annotations

import random
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from msnet.errors import MsnetError
from msnet.core import (ACTIVATIONS, CLASSIFIERS, INTEGRATORS, RESIDUALS, ModelSpec, StageSpec, StochasticDepth,
                         resolve_dtype)
from msnet.core.network import check_connective, check_p_last, check_step_bound
from msnet.core.stability import check_scheme, scheme_note
from msnet.config import Objective, check_known_keys, stochastic_depth_p_last
from msnet.data import DATASETS, DataBundle
from msnet.multigrid.time import check_knots
from msnet.runs import load_checkpoint
from msnet.runs.tracking import check_backend
from msnet.training import distributed, speed
from msnet.training.distributed import DistEnv
from msnet.methods import selected_rule


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def preflight(cfg: DictConfig, env: Optional[DistEnv] = None,
              overrides: Optional[List[str]] = None) -> Tuple[DictConfig, Optional[Dict[str, Any]]]:
    """What must hold before data is loaded or anything is written, in one place.

    With ``cfg.resume`` the checkpoint is read and its config, with the keys the user overrode
    (``overrides``) taken from ``cfg``, becomes the run's (:func:`resumed_config`). Returns that
    config and the checkpoint (None for a new run). Every failure is one :class:`MsnetError` line.
    """
    check_known_keys(cfg, overrides)
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        cfg = resumed_config(ckpt["config"], cfg, overrides)
    check_config(cfg, env)
    return cfg, ckpt


def check_config(cfg: DictConfig, env: Optional[DistEnv] = None) -> None:
    """Check every registry name and range once, before data is loaded or anything is written.

    ``env``: the processes the run will train on (one when None). The update rule the config
    selects checks its own settings (:meth:`~msnet.methods.base.UpdateRule.check`) and says
    whether data-parallel training and the GPU speed options apply to it.
    """
    if cfg.seed is None:
        raise MsnetError("seed must be an integer (e.g. seed=0)")
    DATASETS.get(cfg.dataset.name)
    RESIDUALS.get(cfg.model.residual)
    ACTIVATIONS.get(cfg.model.activation)
    INTEGRATORS.get(cfg.model.integrator)
    if cfg.model.classifier not in CLASSIFIERS:
        raise MsnetError(
            f"unknown classifier {cfg.model.classifier!r}; choose one of: {', '.join(sorted(CLASSIFIERS))}"
        )
    resolve_dtype(cfg.dtype)
    for key in ("epochs", "batch_size", "eval_batch_size", "log_every", "checkpoint_every"):
        if cfg.trainer[key] < 1:
            raise MsnetError(f"trainer.{key} must be at least 1, got {cfg.trainer[key]}")
    growth = cfg.trainer.batch_growth
    if growth is None or not float(growth) >= 1.0:
        raise MsnetError(f"trainer.batch_growth must be at least 1 (1: a fixed mini-batch), got {growth}")
    cap = cfg.trainer.batch_max
    if cap is not None and int(cap) < int(cfg.trainer.batch_size):
        raise MsnetError(f"trainer.batch_max={cap} is below trainer.batch_size={cfg.trainer.batch_size}; "
                         f"raise it, or null for the whole training set")
    check_level_patience(cfg)
    for key in ("channels", "stages", "layers", "growth"):
        if cfg.model[key] < 1:
            raise MsnetError(f"model.{key} must be at least 1, got {cfg.model[key]}")
    if not cfg.model.T > 0:
        raise MsnetError(f"model.T must be positive, got {cfg.model.T}")
    if cfg.get("threads") is not None and int(cfg.threads) < 1:
        raise MsnetError(f"threads must be at least 1 (or null for torch's default), got {cfg.threads}")
    check_p_last(stochastic_depth_p_last(cfg.model))
    check_architecture(cfg.model)
    knots = cfg.model.init_knots
    if knots is not None:  # the network starts at depth.start steps under +depth, else model.layers
        check_knots(int(knots), int(cfg.depth.start if cfg.depth is not None else cfg.model.layers))
    rule = selected_rule(cfg)
    rule.check(cfg)
    distributed.check(cfg, env or DistEnv(), rule)
    speed.check(cfg, rule)
    check_backend(cfg)


def check_level_patience(cfg: DictConfig) -> None:
    """``trainer.level_patience`` / ``patience`` / ``min_delta``: in range, and only where there are levels (for
    ``level_patience``) and validation data."""
    delta = cfg.trainer.min_delta
    if delta is None or not float(delta) >= 0:
        raise MsnetError(f"trainer.min_delta must be >= 0, got {delta}")
    final = cfg.trainer.patience
    watched = f"{Objective(cfg.trainer.objective).monitor[0]} (trainer.objective={cfg.trainer.objective})"
    if final is not None:
        if int(final) < 1:
            raise MsnetError(f"trainer.patience must be at least 1 (or null: no early stopping), got {final}")
        if int(cfg.dataset.val_size) == 0:
            raise MsnetError(f"trainer.patience={final} watches {watched}, but dataset.val_size=0 "
                             f"holds out no validation images; set dataset.val_size=N")
    patience = cfg.trainer.level_patience
    if patience is None:
        return
    if int(patience) < 1:
        raise MsnetError(f"trainer.level_patience must be at least 1 (or null: every level trains its epochs), "
                         f"got {patience}")
    if cfg.get("pyramid") is None and cfg.get("depth") is None:
        raise MsnetError(f"trainer.level_patience={patience} ends a level early, but this run has one level; "
                         f"add +pyramid=2level or +depth=doubling, or drop it")
    if int(cfg.dataset.val_size) == 0:
        raise MsnetError(f"trainer.level_patience={patience} watches {watched}, but dataset.val_size=0 "
                         f"holds out no validation images; set dataset.val_size=N")


def stage_widths(model_cfg: Any) -> List[int]:
    """Channels of each stage: ``model.widths`` when set, else ``channels * growth**i``."""
    widths = model_cfg.widths
    if widths is None:
        return [int(model_cfg.channels * model_cfg.growth**i) for i in range(int(model_cfg.stages))]
    widths = [int(w) for w in widths]
    if len(widths) != int(model_cfg.stages) or min(widths) < 1:
        raise MsnetError(
            f"model.widths={widths} needs one positive channel count per stage (model.stages={model_cfg.stages})"
        )
    return widths


def check_architecture(model_cfg: Any) -> None:
    """Integrator, residual, backprop and connective fit together at the stage widths.

    Configs saved before ``backprop``/``connective`` existed read as ``store``/``conv``.
    """
    widths = stage_widths(model_cfg)
    backprop = model_cfg.backprop
    check_scheme(INTEGRATORS.get(model_cfg.integrator), RESIDUALS.get(model_cfg.residual), backprop, widths)
    check_connective(model_cfg.connective, widths)
    check_step_bound(step_bound(model_cfg), INTEGRATORS.get(model_cfg.integrator), RESIDUALS.get(model_cfg.residual))


def step_bound(model_cfg: Any) -> Optional[float]:
    """``model.step_bound`` as a float, or None (off; also for configs saved before it existed)."""
    value = model_cfg.step_bound
    return None if value is None else float(value)


def stability_notes(model_cfg: Any) -> List[str]:
    """Warnings (not errors) the model config alone gives: an integrator on a residual whose Jacobian spectrum
    it is not stable on at any step size (:func:`~msnet.core.stability.scheme_note`), e.g. the plain
    ``model=midpoint model.residual=conv_act`` kept for comparison. One line each, naming the stable fields."""
    note = scheme_note(INTEGRATORS.get(model_cfg.integrator), RESIDUALS.get(model_cfg.residual))
    return ([note] if note else []) + long_stage_notes(model_cfg)


# Integrators whose stages drifted and did not learn once T was long (measured 2026-12-02, docs/methods/reversible.md
# "Deep leapfrog"): a per-step bound that keeps T ||K|| about fixed, as a function of the steps N per stage.
# Leapfrog: h^2 ||K||^2 / 4 <= 16 / N^2 (T ||K|| <= 8); Hamiltonian: h ||K1|| ||K2|| / 2 <= 3 / N.
LONG_STAGE_BOUNDS = {"leapfrog": lambda n: 16.0 / n ** 2, "hamiltonian": lambda n: 3.0 / n}
LONG_STAGE_T = 8.0  # the presets (T = 6) learn unbounded; T = 16 stayed at 10 % without a bound


def long_stage_notes(model_cfg: Any) -> List[str]:
    """One warning for a leapfrog or Hamiltonian stage longer than ``LONG_STAGE_T`` with no ``model.step_bound``.

    Such a stage conserves an energy that lets relu states coast, so the state drifts like T (||K|| |y_0| + |b|)
    and the output's sensitivity to a step's bias like T^2: at T = 16, h = 1 the first Adam step threw the loss
    from 2.8 to 93 while every step stayed inside its step-size condition. Bounding each step's ratio by
    ``LONG_STAGE_BOUNDS`` (T ||K|| about fixed) made it learn; the line names that bound for this N.
    """
    bound = LONG_STAGE_BOUNDS.get(str(model_cfg.integrator))
    if bound is None or step_bound(model_cfg) is not None or float(model_cfg.T) <= LONG_STAGE_T:
        return []
    n = int(model_cfg.layers)
    return [f"model.T={float(model_cfg.T):g} with the {model_cfg.integrator} integrator: stages this long drifted and did "
            f"not learn here without a bound; add model.step_bound={min(1.0, bound(n)):.3g} (keeps T ||K|| about fixed "
            f"for {n} steps), or use model.T<={LONG_STAGE_T:g}"]


def model_spec(model_cfg: Any, data: DataBundle) -> ModelSpec:
    """The :class:`ModelSpec` the ``model`` config describes, sized for ``data``."""
    stages = [StageSpec(c, int(model_cfg.layers), float(model_cfg.T)) for c in stage_widths(model_cfg)]
    spec = ModelSpec(
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        image_size=data.image_size,
        stages=stages,
        residual=model_cfg.residual,
        activation=model_cfg.activation,
        integrator=model_cfg.integrator,
        classifier=model_cfg.classifier,
        stochastic_depth=StochasticDepth(stochastic_depth_p_last(model_cfg)),
        connective=str(model_cfg.connective),
        backprop=str(model_cfg.backprop),
        step_bound=step_bound(model_cfg),
    )
    spec.validate()
    return spec


def override_keys(overrides: Optional[List[str]]) -> List[str]:
    """Config keys named by command-line overrides (``+a.b=1`` -> ``a.b``; ``optimizer=sgd`` -> ``optimizer``)."""
    keys = []
    for o in overrides or []:
        key = o.split("=", 1)[0].lstrip("+~")
        if key and not key.startswith("hydra"):
            keys.append(key)
    return keys


def resumed_config(saved: dict, current: DictConfig, overrides: Optional[List[str]]) -> DictConfig:
    """The checkpoint's config, with the keys the user overrode now taken from ``current``.

    ``msnet train resume=PATH`` repeats the interrupted run exactly; ``... trainer.epochs=10``
    extends it. ``resume`` itself always comes from ``current``.
    """
    cfg = OmegaConf.create(saved)
    with open_dict(cfg):
        for key in override_keys(overrides):
            value = OmegaConf.select(current, key, throw_on_missing=False)
            OmegaConf.update(cfg, key, OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value, merge=False, force_add=True)
        cfg.resume = current.resume
    return cfg

"""Level schedules: the resolutions (and epochs, learning rates) a training run goes through.

A plain run has one level. ``+pyramid=NLlevel`` trains on images restricted N-1 times
first, then prolongs stencils and classifier one level at a time up to ``level`` (the
paper's Algorithm 1). ``+depth=doubling`` trains ``depth.start`` layers per stage first,
then prolongs the parameters in time to twice the layers (T kept) up to ``depth.stop``.
Level names: ``fine`` = the data's native resolution, ``coarse`` = one restriction,
``coarser`` = two; ``downK`` beyond.

With both, the depth cascade runs first, on the coarsest images (in place of the
pyramid's coarsest level and its epochs), and the resolution pyramid then continues at
the final depth: every shallow problem is solved on the cheapest grid, and the most
expensive problem (deepest and finest) is solved once, from the best starting point.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from msnet.config import Objective
from msnet.errors import MsnetError
from msnet.data import DataBundle
from msnet.multigrid import (TRANSFERS, FitReport, check_stencil_transfer, fit_transfer, level_data, transfer_depth,
                             transfer_resolution)
from msnet.multigrid.datafit import check_fittable, fit_sample
from msnet.multigrid.levels import level_name, parse_level, transfer_settings
from msnet.multigrid.time import prolong_optimizer_state

@dataclass
class Level:
    """One level of a schedule: ``down`` restrictions below the native resolution.

    ``epochs`` counts the epochs begun at the level; ``share`` (0 < share <= 1) is the part of the last one
    trained (a random subset of that many training images), so a level trains ``epochs - 1 + share`` epochs.
    """

    name: str
    down: int
    epochs: int
    lr: Optional[float] = None
    layers: Optional[int] = None  # time steps per stage; None: model.layers
    share: float = 1.0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def trained_epochs(self) -> float:
        """The epochs the level trains: ``epochs - 1 + share`` (0 for a level of no epochs)."""
        return self.epochs - 1 + self.share if self.epochs else 0.0


@dataclass
class Schedule:
    """The levels a run trains through, coarsest/shallowest first, and how a network moves between them.

    ``operator`` / ``sigma``: the image transfer pair and the smoothing before each restriction
    (the pyramid's, else ``linear`` and 1); ``time_prolongation``: how parameters move to more
    layers (the depth schedule's, else ``linear``); ``carry_optimizer``: a move in depth alone carries the
    first-order optimiser's state (``depth.carry_optimizer``, :meth:`carry`); ``pyramid``: the pyramid config (stencil fit
    settings) or None; ``seed``: draws the stencil fit's images; ``patience`` / ``final_patience`` / ``min_delta``:
    a level before the last (``trainer.level_patience``), or the last one (``trainer.patience``, early stopping),
    ends early at a plateau of the ``monitor`` metric (key, higher-is-better; that of ``trainer.objective``,
    :meth:`ends_early`). One schedule serves one dataset: :meth:`data_at`
    caches each level's restricted images.
    """

    levels: List[Level]
    operator: str = "linear"
    sigma: float = 1.0
    time_prolongation: str = "linear"
    pyramid: Any = None
    seed: int = 0
    carry_optimizer: bool = False
    patience: Optional[int] = None
    min_delta: float = 0.0
    final_patience: Optional[int] = None
    monitor: Tuple[str, bool] = ("val_loss", False)
    _data: Dict[int, DataBundle] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.levels)

    def __getitem__(self, i: int) -> Level:
        return self.levels[i]

    def __iter__(self) -> Iterator[Level]:
        return iter(self.levels)

    def ends_early(self, index: int, rows: List[Dict[str, Any]]) -> bool:
        """Whether level ``index`` ends after the epochs ``rows`` (its ``metrics.jsonl`` rows, first first) because
        the monitored validation metric (:attr:`monitor`) has plateaued (:func:`plateaued`) for the level's patience
        (:meth:`patience_of`)."""
        patience = self.patience_of(index)
        key, higher = self.monitor
        return patience is not None and plateaued([r.get(key) for r in rows], patience, self.min_delta, higher)

    def patience_of(self, index: int) -> Optional[int]:
        """The plateau patience of level ``index``: ``trainer.patience`` for the last, ``trainer.level_patience``
        for the others (None: it trains all its epochs)."""
        return self.final_patience if index == len(self.levels) - 1 else self.patience

    def patience_key(self, index: int) -> str:
        """The setting behind :meth:`patience_of` (for messages)."""
        return "trainer.patience" if index == len(self.levels) - 1 else "trainer.level_patience"

    def data_at(self, data: DataBundle, down: int) -> DataBundle:
        """``data`` restricted ``down`` times as this schedule restricts it (computed once per level)."""
        if down not in self._data:
            self._data[down] = level_data(data, down, self.operator, self.sigma)
        return self._data[down]

    def start_model(self, net: torch.nn.Module) -> torch.nn.Module:
        """A network built at the native resolution, moved to the first level's grid (same random draws
        as a plain run at that depth)."""
        return transfer_resolution(net, -self.levels[0].down, self.operator) if self.levels[0].down else net

    def move(self, net: torch.nn.Module, src: Level, dst: Level, data: Optional[DataBundle] = None,
             replay: bool = False) -> Tuple[torch.nn.Module, Optional[FitReport]]:
        """Carry ``net`` from level ``src`` to ``dst``: in space (:func:`prolong_level`), then in time.

        ``replay``: only the shapes matter (a resumed run loads its weights next), so no data and
        no stencil fit. Returns the moved network and the stencil fit's report (None without one).
        """
        fit = None
        if src.down != dst.down:
            if replay:
                net = transfer_resolution(net, src.down - dst.down, self.operator)
            else:
                net, fit = prolong_level(net, self.data_at(data, src.down), self.data_at(data, dst.down),
                                         src.down - dst.down, self.pyramid, self.seed)
        if dst.layers is not None and dst.layers != (src.layers or net.depth()[0]):
            net = transfer_depth(net, dst.layers, self.time_prolongation)
        return net, fit

    def carry(self, src: Level, dst: Level, old_rule: Any, old_net: torch.nn.Module, new_rule: Any,
              new_net: torch.nn.Module) -> int:
        """After a move from ``src`` to ``dst`` and the new level's rule: with ``carry_optimizer``, a move in depth
        alone (same resolution) between two rules with a ``torch.optim`` optimiser of the same kind hands the old
        optimiser's state on (:func:`~msnet.multigrid.time.prolong_optimizer_state`). Returns the number of
        parameters carried (0: the new optimiser starts fresh)."""
        old_opt, new_opt = getattr(old_rule, "optimizer", None), getattr(new_rule, "optimizer", None)
        if (not self.carry_optimizer or src.down != dst.down or not isinstance(old_opt, torch.optim.Optimizer)
                or type(old_opt) is not type(new_opt)):
            return 0
        return prolong_optimizer_state(old_opt, old_net, new_opt, new_net, self.time_prolongation)


def plateaued(values: List[Optional[float]], patience: int, min_delta: float = 0.0, higher: bool = False) -> bool:
    """Whether none of the last ``patience`` values improves by more than ``min_delta`` on the best one before them:
    is more than ``min_delta`` below it (a loss), or above it with ``higher`` (an accuracy). False until there are
    more than ``patience`` values, or when one is missing or not finite."""
    if len(values) <= patience or any(v is None or not math.isfinite(v) for v in values):
        return False
    if higher:
        return max(values[-patience:]) <= max(values[:-patience]) + min_delta
    return min(values[-patience:]) >= min(values[:-patience]) - min_delta


def max_restrictions(native: Tuple[int, int], stages: int) -> int:
    """How often ``native`` images can be halved while the last stage still has a grid of >= 2x2 pixels."""
    h, w = native
    k = 0
    while h % 2 ** (k + stages) == 0 and w % 2 ** (k + stages) == 0 and min(h, w) // 2 ** (k + stages) >= 2:
        k += 1
    return k


def check_levels(native: Tuple[int, int], coarsest: int, stages: int, what: str, fix: str) -> None:
    """Fail with one line if the images cannot be restricted ``coarsest`` times for this network.

    ``fix(k)`` words the remedy given the largest admissible number of restrictions k.
    """
    if coarsest > max_restrictions(native, stages):
        h, w = native
        need = 2 ** (coarsest + stages - 1)
        raise MsnetError(
            f"{what} is too deep for {h}x{w} images with {stages} stage(s): the coarsest level needs "
            f"{h}x{w} divisible by {need}; {fix(max_restrictions(native, stages))}"
        )


def depth_levels(depth: Any) -> List[int]:
    """Layers per stage of each depth level: start, start*factor, ..., stop."""
    start, stop, factor = int(depth.start), int(depth.stop), int(depth.factor)
    if start < 1 or factor < 2 or stop < start:
        raise MsnetError(f"depth needs 1 <= start <= stop and factor >= 2, got start={start} stop={stop} factor={factor}")
    out = [start]
    while out[-1] < stop:
        out.append(out[-1] * factor)
    if out[-1] != stop:
        raise MsnetError(f"depth.stop={stop} is not depth.start={start} times a power of {factor}; use e.g. stop={out[-1]}")
    return out


def _per_level(values: Any, n: int, what: str) -> List[Any]:
    values = list(values) if values is not None else [None]
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise MsnetError(f"{what} needs 1 or {n} entries (first level first), got {values}")
    return values


def depth_epochs(depth: Any, layers: List[int]) -> List[Tuple[int, float]]:
    """``(epochs begun, share of the last one)`` for each depth level (``layers`` per stage) as ``depth.epochs`` asks.

    ``depth.sizing=cost`` reads each entry as the level's work in epochs at the deepest level, ``depth.stop``
    layers (a step costs the same at every depth): a level of d layers then trains ``entry * stop / d``
    epochs, so the last level's entry is its epochs either way. Fractions of an epoch are allowed.
    """
    entries = [float(e) for e in _per_level(depth.epochs, len(layers), "depth.epochs")]
    if any(e < 0 or not math.isfinite(e) for e in entries):
        raise MsnetError(f"depth.epochs must be >= 0, got {entries}")
    cost = str(depth.get("sizing", "epochs")) == "cost"
    out = []
    for d, e in zip(layers, entries):
        total = round(e * layers[-1] / d if cost else e, 6)  # round-off must not begin an extra epoch
        begun = math.ceil(total)
        out.append((begun, round(total - begun + 1, 6) if begun else 1.0))
    return out


def build_schedule(cfg: Any, native: Tuple[int, int], stages: int) -> Schedule:
    """The levels ``cfg`` asks for, in training order, ending at ``cfg.level`` (and ``depth.stop``)."""
    finest = parse_level(cfg.level, native)
    pyramid = cfg.get("pyramid")
    depth = cfg.get("depth")
    if pyramid is None:
        levels = [Level(level_name(finest), finest, int(cfg.trainer.epochs))]
    else:
        n = int(pyramid.levels)
        if n < 1:
            raise MsnetError(f"pyramid.levels must be at least 1, got {n}")
        epochs = list(pyramid.epochs)
        if len(epochs) != n:
            raise MsnetError(f"pyramid.epochs needs {n} entries (coarsest first), got {epochs}")
        lrs = list(pyramid.lr) if pyramid.lr is not None else [None] * n
        if len(lrs) != n:
            raise MsnetError(f"pyramid.lr needs {n} entries (coarsest first) or null, got {lrs}")
        TRANSFERS.get(pyramid.operator)  # unknown operator: one line listing the choices
        check_stencil_transfer(pyramid.get("stencils", "galerkin"))
        if pyramid.get("stencils") == "fit" and int(pyramid.fit_images) < 1:
            raise MsnetError(f"pyramid.fit_images must be at least 1, got {pyramid.fit_images}")
        levels = [
            Level(level_name(finest + n - 1 - i), finest + n - 1 - i, int(epochs[i]), lrs[i]) for i in range(n)
        ]
        if any(lv.epochs < 0 for lv in levels):
            raise MsnetError(f"pyramid.epochs must be >= 0, got {epochs}")
    if depth is not None:
        from msnet.multigrid import TIME_PROLONGATIONS

        TIME_PROLONGATIONS.get(depth.prolongation)
        layers = depth_levels(depth)
        epochs = depth_epochs(depth, layers)
        lrs = _per_level(depth.lr, len(layers), "depth.lr")
        first = levels[0]
        cascade = [Level(first.name, first.down, e, lr, d, share) for d, (e, share), lr in zip(layers, epochs, lrs)]
        levels = cascade + [replace(lv, layers=layers[-1]) for lv in levels[1:]]
    if pyramid is not None:
        check_levels(native, levels[0].down, stages, f"pyramid.levels={pyramid.levels}" + (f" ending at level={cfg.level}" if finest else ""),
                     lambda k: f"use pyramid.levels={k - finest + 1} or fewer" if k >= finest else f"use level=fine and at most {k + 1} levels")
    else:
        check_levels(native, finest, stages, f"level={cfg.level}", lambda k: f"use a level at most {k} restriction(s) below fine")
    operator, sigma = transfer_settings(cfg)
    trainer = cfg.trainer
    return Schedule(levels, operator, sigma, str(depth.prolongation) if depth is not None else "linear", pyramid,
                    int(cfg.seed), bool(depth.get("carry_optimizer", False)) if depth is not None else False,
                    trainer.level_patience, float(trainer.min_delta), trainer.patience,
                    Objective(trainer.objective).monitor)


def check_stencil_fit(cfg: Any, model: torch.nn.Module) -> None:
    """Fail at start, in one line, if ``pyramid.stencils=fit`` is asked of a model the fit does not support."""
    pyramid = cfg.get("pyramid")
    if pyramid is not None and pyramid.get("stencils") == "fit" and int(pyramid.levels) > 1:
        check_fittable(model, "pyramid.stencils")


def prolong_level(
    model: torch.nn.Module, src: DataBundle, dst: DataBundle, levels: int, pyramid: Any, seed: int,
) -> Tuple[torch.nn.Module, Optional[FitReport]]:
    """Move ``model`` ``levels`` restrictions finer (< 0: coarser) as ``pyramid`` says; ``src``/``dst``: each level's data.

    ``pyramid.stencils=galerkin`` is the paper's transfer (:func:`transfer_resolution`);
    ``fit`` refits the Galerkin network's stencils on ``pyramid.fit_images`` training images
    (the same ones at both resolutions, drawn with ``seed``) so that the two networks'
    pre-activations agree on the coarse grid (:func:`msnet.multigrid.fit_transfer`), one level
    at a time. Returns the new network and the fit's report (None for galerkin).
    """
    op = str(pyramid.get("operator", "linear")) if pyramid is not None else "linear"
    stencils = str(pyramid.get("stencils", "galerkin")) if pyramid is not None else "galerkin"
    if stencils != "fit":
        return transfer_resolution(model, levels, op), None
    if abs(levels) != 1:
        raise MsnetError("the data-fitted stencil transfer moves one level at a time")
    idx = fit_sample(src.x_train.shape[0], pyramid, seed).to(src.x_train.device)
    moved = transfer_resolution(model, levels, op)
    report = fit_transfer(model, moved, src.x_train[idx], dst.x_train[idx], op, float(pyramid.get("fit_ridge", 1e-3)))
    return moved, report

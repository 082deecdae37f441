"""``RunState``: everything a training run carries from epoch to epoch, and everything a resume restores.

A new run starts with :meth:`RunState.start` (a seeded network on the schedule's first level,
optionally warm-started with ``init=``); an interrupted one continues with
:meth:`RunState.resume` (the same network rebuilt, moved through the levels it had finished,
its weights, RNG streams and history loaded). :meth:`RunState.payload` is what a checkpoint
holds (:func:`msnet.runs.checkpoint.make_payload`). The run's best checkpoint (``trainer.save_best``) is
decided here too (:meth:`RunState.is_best`, :func:`watched_metric`, :func:`carry_best`,
:func:`best_checkpoint_summary`).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig

from msnet.config import Objective
from msnet.errors import MsnetError
from msnet.core import ModelSpec, build_model
from msnet.multigrid.time import smooth_in_time_
from msnet.data import DataBundle
from msnet.runs import load_checkpoint, make_payload
from msnet.runs.checkpoint import load_model_state, saved_spec
from msnet.training.evaluation import evaluate
from msnet.training.schedule import Schedule, check_stencil_fit
from msnet.training.setup import set_seed
from msnet.methods.base import UpdateRule


def rng_state(generator: torch.Generator) -> Dict[str, Any]:
    """The global torch RNG (stochastic depth), the data-order generator and, where seen, CUDA's."""
    state = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def spec_diff(a: ModelSpec, b: ModelSpec) -> str:
    """The fields in which two model specs differ, for a one-line error."""
    da, db = a.to_dict(), b.to_dict()
    return "; ".join(f"{k}: {da[k]} vs {db[k]}" for k in da if da[k] != db.get(k))[:200]


@dataclass
class RunState:
    """A run's position and what it has produced so far.

    ``level_index`` / ``level_epoch``: the level being trained and the epochs finished in it;
    ``epoch``: epochs finished over all levels; ``history``: every metrics row so far;
    ``level_summaries``: one row per finished level (with its stencil fit, from ``fits``);
    ``rule``: the current level's update rule (its state goes into checkpoints).
    """

    model: torch.nn.Module
    generator: torch.Generator
    history: List[Dict[str, Any]] = field(default_factory=list)
    epoch: int = 0
    level_index: int = 0
    level_epoch: int = 0
    level_summaries: List[Dict[str, Any]] = field(default_factory=list)
    fits: Dict[str, Dict[str, float]] = field(default_factory=dict)
    rule: Optional[UpdateRule] = None
    resumed_from: Optional[Dict[str, Any]] = None
    initialised_from: Optional[Dict[str, Any]] = None
    wall_before: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def wall_time(self) -> float:
        """Seconds of training so far, over every session of this run (a resumed run adds to its checkpoint's)."""
        return self.wall_before + time.perf_counter() - self.started

    @classmethod
    def start(cls, cfg: DictConfig, spec: ModelSpec, schedule: Schedule, device: torch.device, dtype: torch.dtype,
              init: bool = True) -> "RunState":
        """A new run: the network drawn with ``cfg.seed`` at the first level's depth, built at native size
        (identical draws whatever the pyramid) and moved to the first level's grid; ``cfg.init``'s weights
        loaded when given (and ``init``)."""
        set_seed(int(cfg.seed))
        if schedule[0].layers is not None:
            for stage in spec.stages:
                stage.layers = schedule[0].layers
        model = build_model(spec).to(device=device, dtype=dtype)
        knots = cfg.model.init_knots
        if knots is not None:
            smooth_in_time_(model, int(knots))
        check_stencil_fit(cfg, model)
        model = schedule.start_model(model)
        if init and cfg.get("init"):
            warm = load_checkpoint(cfg.init)
            saved = saved_spec(warm)
            if saved != model.spec:
                raise MsnetError(
                    f"init={warm['path']} holds a different model than this run starts with "
                    f"({spec_diff(saved, model.spec)}); match the model, level and pyramid to the checkpoint"
                )
            load_model_state(model, warm)
            return cls(model, torch.Generator().manual_seed(int(cfg.seed)),
                       initialised_from={"path": warm["path"], "level": warm.get("level")})
        return cls(model, torch.Generator().manual_seed(int(cfg.seed)))

    @classmethod
    def resume(cls, ckpt: Dict[str, Any], cfg: DictConfig, spec: ModelSpec, schedule: Schedule,
               device: torch.device, dtype: torch.dtype) -> "RunState":
        """The run ``ckpt`` was written by, at the end of its last finished epoch: the network moved through
        the levels it had passed (shapes only), then its weights, RNG streams, history and level summaries."""
        state = cls.start(cfg, spec, schedule, device, dtype, init=False)
        state.level_index = int(ckpt.get("level_index", 0))
        state.level_epoch = int(ckpt.get("level_epoch", ckpt["epoch"]))
        if state.level_index >= len(schedule):
            raise MsnetError(
                f"checkpoint {ckpt['path']} is at level {state.level_index}, beyond this schedule; start a new run"
            )
        for a, b in zip(schedule.levels[: state.level_index], schedule.levels[1 : state.level_index + 1]):
            state.model, _ = schedule.move(state.model, a, b, replay=True)
        saved = saved_spec(ckpt)
        if saved != state.model.spec:
            raise MsnetError(
                f"checkpoint {ckpt['path']} holds a different model ({spec_diff(saved, state.model.spec)}); "
                "drop the model/dataset overrides to resume it, or start a new run"
            )
        load_model_state(state.model, ckpt)
        restore_rng(ckpt["rng"], state.generator)
        state.history = list(ckpt.get("history", []))
        if state.level_index == len(schedule) - 1 and state.level_epoch >= schedule[-1].epochs:
            raise MsnetError(
                f"checkpoint {ckpt['path']} already finished {ckpt['epoch']} epochs; "
                f"add trainer.epochs=N with N > {ckpt['epoch']} to train further"
            )
        if state.level_index == len(schedule) - 1 and state.ended_early(schedule):
            raise MsnetError(
                f"checkpoint {ckpt['path']} stopped early after {ckpt['epoch']} epochs (trainer.patience="
                f"{schedule.final_patience}: its validation loss had stopped improving); raise trainer.patience or "
                f"set trainer.patience=null to train further"
            )
        state.epoch = state.history[-1]["epoch"] if state.history else 0
        # the summary of the level the checkpoint is in stays only if that level is still over (an extension,
        # trainer.epochs=N, trains it on and summarises it again at its new end)
        levels = list(ckpt.get("levels", []))
        state.level_summaries = levels if state.finished(schedule) else levels[: state.level_index]
        state.wall_before = state.history[-1]["wall_time_s"] if state.history else 0.0
        state.resumed_from = ckpt
        return state

    def finished(self, schedule: Schedule) -> bool:
        """Whether the current level is over: it has had all its epochs, or it ends early at a validation plateau
        (``trainer.level_patience``, :meth:`Schedule.ends_early`; read from the history, so a resume agrees)."""
        return self.level_epoch >= schedule[self.level_index].epochs or self.ended_early(schedule)

    def ended_early(self, schedule: Schedule) -> bool:
        """Whether the current level ends before its scheduled epochs, at a validation plateau."""
        return (self.level_epoch < schedule[self.level_index].epochs
                and schedule.ends_early(self.level_index, self.level_rows()))

    def is_best(self, schedule: Schedule, key: str, higher: bool) -> bool:
        """Whether the epoch just finished is the last level's best so far by the validation metric ``key``
        (``higher``: larger is better); strictly better than every earlier epoch of that level."""
        if self.level_index != len(schedule) - 1 or not self.level_epoch:
            return False
        values = [r.get(key) for r in self.level_rows()]
        now, before = values[-1], [v for v in values[:-1] if v is not None and math.isfinite(v)]
        if now is None or not math.isfinite(now):
            return False
        return not before or (now > max(before) if higher else now < min(before))

    def level_rows(self) -> List[Dict[str, Any]]:
        """The ``metrics.jsonl`` rows of the current level's finished epochs, first first."""
        rows = [r for r in self.history if r.get("level_epoch", 0) >= 1]
        return rows[len(rows) - self.level_epoch:] if self.level_epoch else []

    def payload(self, cfg: DictConfig, schedule: Schedule,
                ranks: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
        """The checkpoint of this state (:func:`msnet.runs.checkpoint.make_payload`); ``ranks``: every DDP rank's
        torch RNG state (:func:`msnet.training.distributed.gather_rng`), kept as ``rng["ranks"]``."""
        rng = {**rng_state(self.generator), **({"ranks": ranks} if ranks is not None else {})}
        return make_payload(
            self.model, cfg, epoch=self.epoch, level=schedule[self.level_index].name,
            rule_state=self.rule.state_dict() if self.rule is not None else None, rng=rng,
            history=self.history, position=(self.level_index, self.level_epoch), levels=self.level_summaries,
            schedule=[lv.to_dict() for lv in schedule],
        )


# --- the best checkpoint (trainer.save_best) --------------------------------------------------------


def watched_metric(cfg: DictConfig, data: DataBundle) -> Optional[Tuple[str, bool]]:
    """The validation metric ``checkpoints/best.pt`` follows: ``("val_acc", True)`` (higher is better) for an
    accuracy ``trainer.objective``, ``("val_loss", False)`` for a loss; None without ``trainer.save_best`` or
    without validation images."""
    if not cfg.trainer.save_best or not data.sizes()["val"]:
        return None
    return Objective(cfg.trainer.objective).monitor


def carry_best(previous: Path, path: Path, epoch: int) -> None:
    """A resumed run starts with the best checkpoint of the run it resumes (``previous``), if that one is from
    an epoch at or before the resumed checkpoint's ``epoch`` (a later one will be trained again). Copied
    atomically (temp file, ``os.replace``)."""
    if not previous.is_file() or previous.resolve() == path.resolve():
        return
    if int(load_checkpoint(previous)["epoch"]) > epoch:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.copyfile(previous, tmp)
    os.replace(tmp, path)


def best_checkpoint_summary(path: Path, model: torch.nn.Module, data: DataBundle, batch_size: int,
                            final: Optional[Tuple[int, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """``summary.json``'s view of ``checkpoints/best.pt``: its path and epoch, and its test loss and accuracy
    (``data``: the last level's images; the weights are loaded into a copy of ``model``). Empty without one.
    ``final``: ``(epoch, level summary)`` of the network the run ended with; when best.pt is that epoch its test
    metrics are the summary's, not measured again."""
    if not path.is_file():
        return {}
    best = load_checkpoint(path)
    out: Dict[str, Any] = {"best_checkpoint": str(path), "best_checkpoint_epoch": int(best["epoch"])}
    if final is not None and final[0] == out["best_checkpoint_epoch"] and final[1].get("test_acc") is not None:
        out["best_checkpoint_test_loss"], out["best_checkpoint_test_acc"] = final[1]["test_loss"], final[1]["test_acc"]
    elif data.sizes()["test"]:
        twin = copy.deepcopy(model)
        load_model_state(twin, best)
        m = evaluate(twin, data.x_test, data.y_test, batch_size)
        out["best_checkpoint_test_loss"], out["best_checkpoint_test_acc"] = m["loss"], m["acc"]
    return out

"""The level loop: generators that train a :class:`~msnet.training.state.RunState` through its schedule.

:func:`run_levels` is the route every ``msnet train`` takes, and the benchmarks drive the same
generator: it moves the network onto each remaining level (:meth:`Schedule.move`), builds the
level's update rule (:func:`level_rule`) and trains the level's epochs (:func:`fit_level`),
yielding a :class:`Step` after each piece of work. The caller decides what to do with each
step (write ``metrics.jsonl``, print, checkpoint, time it against a baseline); the generator
owns the state's bookkeeping (history, position, level summaries).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress

from msnet.data import DataBundle
from msnet.training import distributed, speed
from msnet.training.distributed import DistEnv
from msnet.training.evaluation import evaluate
from msnet.training.loop import train_epoch
from msnet.methods.regularizers import build_regularizer
from msnet.training.schedule import Level, Schedule
from msnet.training.state import RunState
from msnet.methods.base import UpdateRule
from msnet.methods import build_update


@dataclass
class Step:
    """One piece of the level loop's work.

    ``kind``: ``"level"`` (the network has moved onto ``level`` and its rule is built; ``record`` is
    the validation row of ``trainer.eval_at_start``, or empty), ``"chunk"`` (a part of an epoch is
    trained, with ``evals_per_epoch > 1``; ``record`` has its validation accuracy), or ``"epoch"``
    (an epoch ended; ``record`` is its ``metrics.jsonl`` row). ``seconds``: the training time the
    step took (the move and stencil fit, or the chunk's batches), evaluation excluded.
    """

    kind: str
    level: Level
    record: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def level_rule(state: RunState, cfg: DictConfig, level: Level, env: DistEnv, device: torch.device) -> UpdateRule:
    """The update rule for ``level``: the level's learning rate, the regulariser on the current network, and
    the speed options / DDP wrapper (rebuilt per level: parameter shapes change)."""
    opt_cfg = cfg.optimizer if level.lr is None else OmegaConf.merge(cfg.optimizer, {"lr": level.lr})
    penalty = build_regularizer(state.model, cfg.regularizer)
    rule = build_update(state.model, cfg, opt_cfg, level.epochs, penalty)
    return speed.prepare_update(rule, state.model, cfg, env, device)


def epoch_parts(n_train: int, share: float, evals_per_epoch: int,
                generator: torch.Generator) -> List[Optional[torch.Tensor]]:
    """The training-image indices of an epoch's chunks (each followed by a validation pass): ``[None]`` for
    the whole set in one chunk, else a random permutation of ``round(share * n_train)`` images split into
    ``evals_per_epoch`` chunks (``share`` < 1: a level's last, partial epoch)."""
    if evals_per_epoch == 1 and share >= 1:
        return [None]
    m = n_train if share >= 1 else max(1, round(share * n_train))
    return list(torch.randperm(n_train, generator=generator)[:m].chunk(evals_per_epoch))


def batch_growth(trainer: Any) -> float:
    """``trainer.batch_growth``; 1.0 (a fixed mini-batch) for configs saved before it existed."""
    return float(trainer.batch_growth)


def epoch_batch_size(trainer: Any, epoch: int, n_train: int) -> int:
    """The mini-batch of the run's ``epoch`` (1-based): ``trainer.batch_size`` times ``trainer.batch_growth`` to the
    power ``epoch - 1``, rounded, at most ``trainer.batch_max`` (null: the whole training set). A growing batch
    (the hybrid stochastic-deterministic regime of multilevel training) makes the later epochs' gradients
    near-deterministic; ``batch_growth=1`` keeps ``trainer.batch_size``."""
    b = int(trainer.batch_size)
    growth = batch_growth(trainer)
    if growth == 1.0:
        return b
    cap = trainer.batch_max or n_train
    return max(b, min(int(cap), round(b * growth ** (epoch - 1))))


def fit_level(state: RunState, data: DataBundle, level: Level, trainer: Any, *, evals_per_epoch: int = 1,
              shard: Optional[distributed.Shard] = None, progress: Optional[Progress] = None,
              on_step: Optional[Callable[[Dict[str, Any]], None]] = None, label: str = "") -> Iterator[Step]:
    """Train ``level``'s remaining epochs (after ``state.level_epoch``) with ``state.rule`` on ``data``.

    Each epoch is one pass of :func:`~msnet.training.loop.train_epoch` over the training set
    (``evals_per_epoch`` > 1: over a fresh random split of it into that many chunks, with a
    validation pass after each chunk; a level's last epoch covers ``level.share`` of it, :func:`epoch_parts`). Appends each epoch's row to ``state.history`` and yields it.
    Where the network's spec sets ``step_bound`` (``model.step_bound``), its
    :meth:`~msnet.core.network.ODEResNet.bound_steps_` runs after every update.
    """
    rule, model = state.rule, state.model
    after_update = model.bound_steps_ if model.spec.step_bound is not None else None
    has_val = bool(data.sizes()["val"])
    n_train = data.sizes()["train"]
    for level_epoch in range(state.level_epoch + 1, level.epochs + 1):
        state.epoch += 1
        lr = rule.lr
        batch = epoch_batch_size(trainer, state.epoch, n_train)
        parts = epoch_parts(n_train, level.share if level_epoch == level.epochs else 1.0, evals_per_epoch,
                            state.generator)
        loss = acc = seconds = 0.0
        samples = 0
        for c, idx in enumerate(parts, start=1):
            x, y = (data.x_train, data.y_train) if idx is None else (data.x_train[idx], data.y_train[idx])
            task = progress.add_task(
                f"{label}epoch {level_epoch}/{level.epochs}" + (f" ({c}/{len(parts)})" if len(parts) > 1 else ""),
                total=-(-len(y) // batch), loss="-", acc="-", ips="-") if progress else None

            def on_progress(done: int, mean_loss: float, mean_acc: float, ips: float, task=task) -> None:
                progress.update(task, completed=done, loss=f"{mean_loss:.4f}", acc=f"{mean_acc:.2%}", ips=f"{ips:.0f}")
                progress.refresh()

            result = train_epoch(model, rule, x, y, batch, state.generator, log_every=trainer.log_every,
                                 on_progress=on_progress if progress else None, epoch=state.epoch, on_step=on_step,
                                 shard=shard, after_update=after_update)
            loss, acc = loss + result.loss * result.samples, acc + result.acc * result.samples
            seconds, samples = seconds + result.seconds, samples + result.samples
            last = c == len(parts)
            if last:
                rule.end_epoch()
            val = evaluate(model, data.x_val, data.y_val, trainer.eval_batch_size) if has_val else {}
            if progress:
                progress.remove_task(task)
            if not last:
                yield Step("chunk", level, {"epoch": state.epoch, "level": level.name, "chunk": c,
                                            "val_loss": val.get("loss"), "val_acc": val.get("acc")}, result.seconds)
        state.level_epoch = level_epoch
        if len(parts) > 1:
            result.loss, result.acc = loss / samples, acc / samples
        record = {
            "epoch": state.epoch,
            "level": level.name,
            "level_epoch": level_epoch,
            "resolution": list(data.image_size),
            "layers": model.depth(),
            "train_loss": result.loss,
            "train_acc": result.acc,
            "val_loss": val.get("loss"),
            "val_acc": val.get("acc"),
            "lr": lr,
            "epoch_time_s": seconds if len(parts) > 1 else result.seconds,
            "samples_per_s": samples / seconds,
            "wall_time_s": state.wall_time(),
            **rule.epoch_stats(),
        }
        if batch_growth(trainer) != 1.0:  # a growing batch: this epoch's
            record["batch_size"] = batch
        state.history.append(record)
        yield Step("epoch", level, record, result.seconds)


def run_levels(state: RunState, schedule: Schedule, data: DataBundle, cfg: DictConfig, *,
               env: Optional[DistEnv] = None, device: Optional[torch.device] = None, evals_per_epoch: int = 1,
               progress: Optional[Progress] = None, on_step: Optional[Callable[[Dict[str, Any]], None]] = None,
               summaries: bool = True) -> Iterator[Step]:
    """Train ``state`` through the rest of ``schedule``: every level from ``state.level_index`` on.

    Per level: move the network there (not for the level a run starts or resumes in), build its
    rule (a resumed run's rule state is loaded), optionally evaluate (``trainer.eval_at_start``),
    then :func:`fit_level`. At a level's end its summary (validation, test, time, stencil fit)
    goes into ``state.level_summaries`` (``summaries=False``: skip the test pass).
    """
    env = env or DistEnv()
    device = device or data.x_train.device
    resumed, first = state.resumed_from, state.level_index
    for li in range(first, len(schedule)):
        lv = schedule[li]
        d = schedule.data_at(data, lv.down)  # restricted before the clock starts: data preparation, not training
        t0 = time.perf_counter()
        old_rule, old_model = state.rule, state.model
        if li > first:
            state.model, fit = schedule.move(state.model, schedule[li - 1], lv, data)
            state.level_index, state.level_epoch = li, 0
            if fit is not None:
                state.fits[lv.name] = fit.to_dict()
        t_level = time.perf_counter()
        state.rule = level_rule(state, cfg, lv, env, device)
        if li > first:
            schedule.carry(schedule[li - 1], lv, old_rule, old_model, state.rule, state.model)
        if resumed is not None and li == first and (not state.finished(schedule) or schedule.carry_optimizer):
            state.rule.load_state_dict(resumed)  # a finished level's state only matters when the next level carries it
        record: Dict[str, Any] = {}
        if cfg.trainer.get("eval_at_start") and state.level_epoch == 0 and d.sizes()["val"]:
            val0 = evaluate(state.model, d.x_val, d.y_val, cfg.trainer.eval_batch_size)
            record = {"epoch": state.epoch, "level": lv.name, "level_epoch": 0, "resolution": list(d.image_size),
                      "layers": state.model.depth(), "val_loss": val0["loss"], "val_acc": val0["acc"],
                      "wall_time_s": state.wall_time()}
            state.history.append(record)
        yield Step("level", lv, record, t_level - t0)
        if state.finished(schedule):  # resumed from the checkpoint of a level's last epoch
            continue
        for step in fit_level(state, d, lv, cfg.trainer, evals_per_epoch=evals_per_epoch, shard=distributed.shard(env),
                              progress=progress, on_step=on_step, label=level_label(schedule, lv, d.image_size)):
            over = step.kind == "epoch" and state.finished(schedule)
            if summaries and over:
                state.level_summaries.append(level_summary(state, lv, d, time.perf_counter() - t_level, cfg,
                                                           state.ended_early(schedule)))
            yield step
            if over:  # all its epochs, or a validation plateau (trainer.level_patience)
                break


def level_label(schedule: Schedule, level: Level, size: Any) -> str:
    """``"coarse 14x14 "`` (and ``"4L"`` for depth levels) before a level's lines, empty for one-level runs."""
    if len(schedule) == 1:
        return ""
    return f"{level.name} {size[0]}x{size[1]}" + (f" {level.layers}L" if level.layers else "") + " "


def level_summary(state: RunState, lv: Level, d: DataBundle, seconds: float, cfg: DictConfig,
                  ended_early: bool = False) -> Dict[str, Any]:
    """Accuracy and loss at the end of a level (validation from the last epoch, test measured now); ``ended_early``:
    the level stopped at a validation plateau after ``state.level_epoch`` epochs (``"ended": "plateau"``)."""
    last = state.history[-1]
    out = {"level": lv.name, "resolution": f"{d.image_size[0]}x{d.image_size[1]}",
           "layers": state.model.depth()[0], "epochs": state.level_epoch if ended_early else _count(lv.trained_epochs()),
           "val_loss": last.get("val_loss"), "val_acc": last.get("val_acc"), "time_s": seconds}
    if ended_early:
        out["ended"] = "plateau"
    if d.sizes()["test"]:
        m = evaluate(state.model, d.x_test, d.y_test, cfg.trainer.eval_batch_size)
        out["test_loss"], out["test_acc"] = m["loss"], m["acc"]
    if lv.name in state.fits:
        out["stencil_fit"] = state.fits[lv.name]
    return out


def _count(epochs: float) -> float | int:
    """Epochs as a table shows them: ``1``, not ``1.0000``; a fractional level (``depth.sizing=cost``) keeps its share."""
    return int(epochs) if float(epochs).is_integer() else epochs

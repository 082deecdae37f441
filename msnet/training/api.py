"""``train(cfg, run_dir)``: the route of every ``msnet train``, importable without the CLI.

Preflight (:func:`msnet.training.setup.preflight`), data, schedule (:mod:`msnet.training.schedule`),
a new or resumed :class:`~msnet.training.state.RunState`, the level loop
(:func:`msnet.training.fit.run_levels`) with a row in ``metrics.jsonl``, a console line and a
checkpoint per epoch, then ``summary.json`` and the closing tables.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig

from msnet.errors import MsnetError
from msnet.core import count_parameters, resolve_device, resolve_dtype
from msnet.data import DataBundle, prepare_data
from msnet.runs import RunConsole, RunDir, save_checkpoint
from msnet.runs.display import columns_of, key_value_table, records_table
from msnet.runs.plots import run_figures
from msnet.runs.tracking import job_identity, open_trackers
from msnet.training import distributed
from msnet.training.fit import level_label, run_levels
from msnet.training.loop import NonFiniteLoss
from msnet.training.schedule import Schedule, build_schedule
from msnet.training.setup import model_spec, preflight, stability_notes
from msnet.training.state import RunState, best_checkpoint_summary, carry_best, watched_metric

EPOCH_COLUMNS = ["epoch", "level", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "batch_size", "work_fge",
                 "epoch_time_s"]
LEVEL_COLUMNS = ["level", "resolution", "layers", "epochs", "val_loss", "val_acc", "test_loss", "test_acc", "time_s"]


def train(
    cfg: DictConfig,
    run_dir: str | Path,
    overrides: Optional[List[str]] = None,
    console: Optional[RunConsole] = None,
    argv: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """Train one network as ``cfg`` says and write everything into ``run_dir``.

    The run goes through the levels of :func:`msnet.training.schedule.build_schedule`: one
    level for plain training, coarsest-to-finest for ``+pyramid=...`` (stencils and
    classifier prolonged between levels). ``overrides`` are the command-line overrides;
    with ``cfg.resume`` they say which keys replace the checkpoint's saved config.
    Returns the summary (also in ``run_dir/summary.json``). Raises :class:`MsnetError`
    for anything a person can fix.

    Under torchrun every rank calls it (:mod:`msnet.training.distributed`): rank 0 writes
    ``run_dir`` and prints, ranks > 0 stay silent and write only into a temporary directory.
    """
    env = distributed.detect()
    with distributed.rank_run_dir(run_dir, env) as local_dir:
        try:
            return _train(cfg, local_dir, overrides, console if env.is_main else RunConsole(quiet=True), argv, env)
        finally:
            distributed.cleanup()


def _train(cfg: DictConfig, run_dir: str | Path, overrides: Optional[List[str]], console: Optional[RunConsole],
           argv: Optional[List[str]], env: distributed.DistEnv) -> Dict[str, Any]:
    """The route of every run: check, open the run directory (and its tracker), then :func:`_run`."""
    console = console or RunConsole()
    cfg, ckpt = preflight(cfg, env, overrides)
    run = _open_run(cfg, Path(run_dir), ckpt, env)
    run.on_tracker_failure = lambda message: _warn(console, [message])
    try:
        return _run(cfg, run, ckpt, console, argv, env)
    finally:
        run.close()


def _open_run(cfg: DictConfig, run_dir: Path, ckpt: Optional[Dict[str, Any]], env: distributed.DistEnv) -> RunDir:
    """The run directory, with the trackers ``cfg.logger`` chose on rank 0 (continuing the resumed run's)."""
    if not env.is_main:
        return RunDir(run_dir)
    previous = Path(ckpt["path"]).parent.parent if ckpt is not None and ckpt.get("path") else None
    return RunDir(run_dir, trackers=open_trackers(cfg, run_dir, previous=previous, **job_identity(run_dir)))


def _run(cfg: DictConfig, run: RunDir, ckpt: Optional[Dict[str, Any]], console: RunConsole,
         argv: Optional[List[str]], env: distributed.DistEnv) -> Dict[str, Any]:
    """Set up, start or resume, train the levels, summarise (after the preflight, into ``run``)."""
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = distributed.setup(env, resolve_device(cfg.device), cfg.threads)
    dtype = resolve_dtype(cfg.dtype)
    run.write_command(argv)

    t_setup = time.perf_counter()
    data = prepare_data(cfg.dataset, device, dtype)
    run.write_config(cfg, data)  # after the data: trackers get its real class count (dataset.num_classes)
    spec = model_spec(cfg.model, data)
    schedule = build_schedule(cfg, data.image_size, len(spec.stages))
    state = (RunState.resume(ckpt, cfg, spec, schedule, device, dtype) if ckpt is not None
             else RunState.start(cfg, spec, schedule, device, dtype))
    distributed.seed_rank(int(cfg.seed), env, (ckpt or {}).get("rng", {}).get("ranks"))
    run.reset_metrics(state.history)
    setup_s = time.perf_counter() - t_setup
    _print_start(console, cfg, data, spec, schedule, state, device, env, run)
    _warn(console, stability_notes(cfg.model))

    ckpt_path, best_path = run.checkpoints / "last.pt", run.checkpoints / "best.pt"
    watch = watched_metric(cfg, data) if env.is_main else None
    if watch is not None and ckpt is not None:
        carry_best(Path(ckpt["path"]).parent / "best.pt", best_path, int(ckpt["epoch"]))
    status, error, last_good = "completed", None, None
    state.started = time.perf_counter()
    try:
        with console.progress(bool(cfg.trainer.progress)) as progress:
            for step in run_levels(state, schedule, data, cfg, env=env, device=device, progress=progress,
                                   on_step=run.log_step):
                if step.record:
                    run.log_metrics(step.record)
                if step.kind == "level" and step.level.name in state.fits and state.level_epoch == 0:
                    fit = state.fits[step.level.name]
                    console.print(f"stencils fitted on {fit['images']} training images in {fit['seconds']:.1f}s: "
                                  f"restricted final-state mismatch {fit['mismatch_galerkin']:.3f} (Galerkin) -> "
                                  f"{fit['mismatch_fit']:.3f}")
                if step.kind != "epoch":
                    continue
                console.print(_epoch_line(step.record, level_label(schedule, step.level, step.record["resolution"])))
                if state.ended_early(schedule):
                    console.print(_plateau_line(state, schedule, step.level, step.record["resolution"]))
                payload = None  # built once for last.pt and best.pt alike
                ranks = distributed.gather_rng(env)  # every rank's stream (DDP; a collective, so every rank asks)
                if state.level_epoch % cfg.trainer.checkpoint_every == 0 or state.finished(schedule):
                    if env.is_main:  # ranks > 0 hold the same weights; rank 0's file is the run's
                        payload = state.payload(cfg, schedule, ranks)
                        save_checkpoint(ckpt_path, payload)
                    last_good = state.epoch
                if watch is not None and state.is_best(schedule, *watch):
                    save_checkpoint(best_path, payload or state.payload(cfg, schedule, ranks))
    except KeyboardInterrupt:
        status = "interrupted"
    except NonFiniteLoss as err:
        status, error = "failed", str(err)

    if run.tracked:
        for name, figure in run_figures(state.history, state.model.state_dict()).items():
            run.log_figure(name, figure)
    summary = _summarize(state, schedule, data, status, error, setup_s, device, env, run, ckpt_path, cfg)
    _print_summary(console, summary, state, schedule)
    console.save(run.path / "console.txt")
    if status == "failed":
        where = (f"the last good checkpoint is {ckpt_path} (epoch {last_good})" if last_good
                 else "no epoch finished, so no checkpoint was written")
        raise MsnetError(f"{error}; {where}; lower optimizer.lr or set trainer.grad_clip")
    if status == "interrupted":
        hint = f"msnet train resume={ckpt_path}" if ckpt_path.exists() else "a new run (no epoch had finished)"
        raise MsnetError(f"interrupted during epoch {state.epoch}; continue with: {hint}")
    return summary


def _warn(console: RunConsole, lines: List[str]) -> None:
    """Warnings that do not stop the run (an integrator on a field it is not stable on), one line each."""
    for line in lines:
        console.print(f"[yellow]warning:[/yellow] {line}")


def _plateau_line(state: RunState, schedule: Schedule, level: Any, resolution: Any) -> str:
    """The line printed when a level (or the run, at its last level) ends early at a validation plateau."""
    patience = schedule.patience_of(state.level_index)
    by = f" by more than {schedule.min_delta:g}" if schedule.min_delta else ""
    span = f"{patience} epoch" + ("s" if patience > 1 else "")
    what = "the run stops" if state.level_index == len(schedule) - 1 else f"{level_label(schedule, level, resolution)}ends"
    watched = "validation accuracy" if schedule.monitor[1] else "validation loss"
    return (f"{what} after {state.level_epoch} of {level.epochs} epochs: its {watched} has not improved{by} "
            f"for {span} ({schedule.patience_key(state.level_index)})")


def _epoch_line(r: Dict[str, Any], label: str) -> str:
    return (f"{label}epoch {r['epoch']:>3}  train loss {r['train_loss']:.4f} acc {r['train_acc']:.2%}  "
            + (f"val loss {r['val_loss']:.4f} acc {r['val_acc']:.2%}  " if r["val_acc"] is not None else "")
            + f"{r['epoch_time_s']:.1f}s")


def _print_start(console: RunConsole, cfg: DictConfig, data: DataBundle, spec: Any, schedule: Schedule,
                 state: RunState, device: torch.device, env: distributed.DistEnv, run: RunDir) -> None:
    """The lines a run opens with: where its weights come from, data, model, device, run folder, levels."""
    if state.initialised_from:
        console.print(f"weights from {state.initialised_from['path']} (level {state.initialised_from['level']})")
    ckpt = state.resumed_from
    console.print(
        f"[bold]msnet train[/bold]  {data.name} {data.image_size[0]}x{data.image_size[1]} "
        f"(train {data.sizes()['train']}, val {data.sizes()['val']}, test {data.sizes()['test']})  "
        f"model {cfg.model.name}: {spec.integrator}, stages "
        f"{[(s.channels, s.layers) for s in spec.stages]}, {count_parameters(state.model)} parameters  "
        f"device {device}" + (f" x {env.world_size} processes" if env.enabled else "") + f"  run {run.path}"
        + (f"  [yellow]resumed from {ckpt['path']} at epoch {ckpt['epoch']}[/yellow]" if ckpt else "")
    )
    if len(schedule) > 1 or schedule[0].down:
        console.print("levels: " + " -> ".join(
            f"{lv.name} {data.image_size[0] >> lv.down}x{data.image_size[1] >> lv.down}"
            + (f" {lv.layers} layers" if lv.layers else "") + f" ({lv.trained_epochs():g} ep)" for lv in schedule))


def _summarize(state: RunState, schedule: Schedule, data: DataBundle, status: str, error: Optional[str],
               setup_s: float, device: torch.device, env: distributed.DistEnv, run: RunDir,
               ckpt_path: Path, cfg: DictConfig) -> Dict[str, Any]:
    """``summary.json``: how the run ended, its final and best accuracies, where everything is."""
    history, model = state.history, state.model
    final: Dict[str, Any] = {}
    if status == "completed":
        last = state.level_summaries[-1] if state.level_summaries else {}
        final = {k: last[k] for k in ("val_loss", "val_acc", "test_loss", "test_acc") if last.get(k) is not None}
    last_level = [r for r in history if r.get("val_acc") is not None and r.get("level") == schedule[-1].name
                  and r.get("layers", model.depth()) == model.depth()]
    best = max(last_level, key=lambda r: r["val_acc"], default=None)
    lowest = min((r for r in last_level if r.get("val_loss") is not None), key=lambda r: r["val_loss"], default=None)
    summary: Dict[str, Any] = {
        "status": status,
        "epochs": state.epoch,
        **({f"final_{k}": v for k, v in final.items()}),
        "final_train_loss": history[-1].get("train_loss") if history else None,
        "final_train_acc": history[-1].get("train_acc") if history else None,
        "best_val_acc": best["val_acc"] if best else None,
        "best_val_epoch": best["epoch"] if best else None,
        "best_val_loss": lowest["val_loss"] if lowest else None,
        "wall_time_s": state.wall_time(),
        "setup_time_s": setup_s,
        "parameters": count_parameters(model),
        "device": str(device),
        "processes": env.world_size,
        "dataset": data.name,
        "level": schedule[-1].name,
        "resolution": list(model.spec.image_size),
        "depth": model.depth(),
        "levels": state.level_summaries,
        "data_sizes": data.sizes(),
        "checkpoint": str(ckpt_path) if ckpt_path.exists() else None,
        **best_checkpoint_summary(ckpt_path.parent / "best.pt", model, schedule.data_at(data, schedule[-1].down),
                                  int(cfg.trainer.eval_batch_size), (state.epoch, final)),
        "resumed_from": state.resumed_from["path"] if state.resumed_from else None,
        "run_dir": str(run.path),
        # what patience, level_patience and best.pt watched (trainer.objective's validation metric)
        "monitor": f"{schedule.monitor[0]} ({'max' if schedule.monitor[1] else 'min'})",
    }
    if error:
        summary["error"] = error
    if state.level_index == len(schedule) - 1 and state.ended_early(schedule):
        summary["stopped_early"] = f"after {state.level_epoch} of {schedule[-1].epochs} epochs (trainer.patience)"
    run.write_summary(summary)
    return summary


def _print_summary(console: RunConsole, summary: Dict[str, Any], state: RunState, schedule: Schedule) -> None:
    """The closing tables: every epoch, every level (for schedules), and the summary."""
    console.print(records_table("epochs", state.history, columns_of(state.history, EPOCH_COLUMNS)))
    if len(schedule) > 1 and state.level_summaries:
        shown_levels = [{**lvs, **{k: f"{lvs[k]:.2%}" for k in ("val_acc", "test_acc") if lvs.get(k) is not None}}
                        for lvs in state.level_summaries]
        ended = ["ended"] if any(lvs.get("ended") for lvs in shown_levels) else []
        console.print(records_table("levels", shown_levels, LEVEL_COLUMNS + ended))
    shown = {k: summary[k] for k in (
        "status", "stopped_early", "epochs", "monitor", "final_val_acc", "final_test_acc", "final_test_loss", "best_val_acc",
        "wall_time_s", "parameters", "device", "checkpoint") if summary.get(k) is not None}
    if summary.get("best_checkpoint"):
        test = summary.get("best_checkpoint_test_acc")
        shown["best_checkpoint"] = (f"{summary['best_checkpoint']} (epoch {summary['best_checkpoint_epoch']}"
                                    + (f", test acc {test:.2%})" if test is not None else ")"))
    for k in ("final_val_acc", "final_test_acc", "best_val_acc"):
        if k in shown:
            shown[k] = f"{shown[k]:.2%}"
    if summary.get("tracker_error"):  # the whole line is in the warning above and in summary.json
        shown["tracker"] = summary["tracker_error"].split(";")[0]
    console.print(key_value_table("summary", shown))

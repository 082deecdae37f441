"""``train(cfg, run_dir)``: single-level training of an ODE-ResNet, importable without the CLI."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from msnet import MsnetError
from msnet.core import ModelSpec, build_model, count_parameters, resolve_device
from msnet.data import prepare_data
from msnet.runs import RunConsole, RunDir, load_checkpoint, make_payload, save_checkpoint
from msnet.runs.checkpoint import load_model_state, saved_spec
from msnet.runs.display import columns_of, key_value_table, records_table
from msnet.train.loop import NonFiniteLoss, evaluate, train_epoch
from msnet.multigrid import level_data, transfer_depth, transfer_resolution
from msnet.train.regularizers import build_regularizer
from msnet.train.schedule import Level, build_schedule, check_stencil_fit, prolong_level
from msnet.train.updates import UpdateRule, build_update
from msnet.train import distributed, speed
from msnet.train.setup import model_spec, preflight, resolve_dtype, set_seed

EPOCH_COLUMNS = ["epoch", "level", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "work_fge",
                 "epoch_time_s"]
LEVEL_COLUMNS = ["level", "resolution", "layers", "epochs", "val_loss", "val_acc", "test_loss", "test_acc", "time_s"]


def _rng_state(generator: torch.Generator) -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: Dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(
    cfg: DictConfig,
    run_dir: str | Path,
    overrides: Optional[List[str]] = None,
    console: Optional[RunConsole] = None,
    argv: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """Train one network as ``cfg`` says and write everything into ``run_dir``.

    The run goes through the levels of :func:`msnet.train.schedule.build_schedule`: one
    level for plain training, coarsest-to-finest for ``+pyramid=...`` (stencils and
    classifier prolonged between levels). ``overrides`` are the command-line overrides;
    with ``cfg.resume`` they say which keys replace the checkpoint's saved config.
    Returns the summary (also in ``run_dir/summary.json``). Raises :class:`MsnetError`
    for anything a person can fix.

    Under torchrun every rank calls it (:mod:`msnet.train.distributed`): rank 0 writes
    ``run_dir`` and prints, ranks > 0 stay silent and write only into a temporary directory.
    """
    env = distributed.detect()
    with distributed.rank_run_dir(run_dir, env) as local_dir:
        try:
            return _train(cfg, local_dir, overrides, console if env.is_main else RunConsole(quiet=True), argv, env)
        finally:
            distributed.cleanup()


def _train(
    cfg: DictConfig,
    run_dir: str | Path,
    overrides: Optional[List[str]],
    console: Optional[RunConsole],
    argv: Optional[List[str]],
    env: distributed.DistEnv,
) -> Dict[str, Any]:
    console = console or RunConsole()
    run = RunDir(run_dir)
    cfg, ckpt = preflight(cfg, env, overrides)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = distributed.setup(env, resolve_device(cfg.device), cfg.threads)
    dtype = resolve_dtype(cfg.dtype)
    run.write_config(cfg)
    run.write_command(argv)

    t_setup = time.perf_counter()
    data = prepare_data(cfg.dataset, device, dtype)
    native_spec = model_spec(cfg.model, data)
    schedule = build_schedule(cfg, data.image_size, len(native_spec.stages))
    op = cfg.pyramid.operator if cfg.get("pyramid") else "linear"
    sigma = float(cfg.pyramid.sigma) if cfg.get("pyramid") else 1.0
    prolongation = cfg.depth.prolongation if cfg.get("depth") else "linear"

    def move(net: torch.nn.Module, src: Level, dst: Level, replay: bool = False) -> torch.nn.Module:
        """Carry a network from one level to the next: in space, then in time.

        ``replay``: only the shapes matter (a resumed run loads its weights next), so no data fit.
        """
        if src.down != dst.down:
            if replay:
                net = transfer_resolution(net, src.down - dst.down, op)
            else:
                net, fit = prolong_level(net, data_at(src.down), data_at(dst.down), src.down - dst.down,
                                         cfg.pyramid, int(cfg.seed))
                if fit is not None:
                    fits[dst.name] = fit.to_dict()
                    console.print(
                        f"stencils fitted on {fit.images} training images in {fit.seconds:.1f}s: restricted "
                        f"final-state mismatch {fit.mismatch_galerkin:.3f} (Galerkin) -> {fit.mismatch_fit:.3f}"
                    )
        if dst.layers is not None and dst.layers != (src.layers or net.depth()[0]):
            net = transfer_depth(net, dst.layers, prolongation)
        return net

    set_seed(int(cfg.seed))
    if schedule[0].layers is not None:
        for stage in native_spec.stages:
            stage.layers = schedule[0].layers
    model = build_model(native_spec).to(device=device, dtype=dtype)
    check_stencil_fit(cfg, model)
    if schedule[0].down:
        # Built at native size for identical random draws, then moved to the coarsest grid.
        model = transfer_resolution(model, -schedule[0].down, op)
    if cfg.get("init") and ckpt is None:
        warm = load_checkpoint(cfg.init)
        saved = saved_spec(warm)
        if saved != model.spec:
            raise MsnetError(
                f"init={warm['path']} holds a different model than this run starts with "
                f"({_spec_diff(saved, model.spec)}); match the model, level and pyramid to the checkpoint"
            )
        load_model_state(model, warm)
        console.print(f"weights from {warm['path']} (level {warm.get('level')})")
    generator = torch.Generator().manual_seed(int(cfg.seed))
    history: List[Dict[str, Any]] = []
    start_level, start_level_epoch = 0, 0
    if ckpt is not None:
        start_level, start_level_epoch = int(ckpt.get("level_index", 0)), int(ckpt.get("level_epoch", ckpt["epoch"]))
        if start_level >= len(schedule):
            raise MsnetError(f"checkpoint {ckpt['path']} is at level {start_level}, beyond this schedule; start a new run")
        for a, b in zip(schedule[:start_level], schedule[1 : start_level + 1]):
            model = move(model, a, b, replay=True)
        saved = saved_spec(ckpt)
        if saved != model.spec:
            raise MsnetError(
                f"checkpoint {ckpt['path']} holds a different model ({_spec_diff(saved, model.spec)}); "
                "drop the model/dataset overrides to resume it, or start a new run"
            )
        load_model_state(model, ckpt)
        _restore_rng(ckpt["rng"], generator)
        history = list(ckpt.get("history", []))
        if start_level == len(schedule) - 1 and start_level_epoch >= schedule[-1].epochs:
            raise MsnetError(
                f"checkpoint {ckpt['path']} already finished {ckpt['epoch']} epochs; "
                f"add trainer.epochs=N with N > {ckpt['epoch']} to train further"
            )
    distributed.seed_rank(int(cfg.seed), env)
    run.reset_metrics(history)
    setup_s = time.perf_counter() - t_setup

    console.print(
        f"[bold]msnet train[/bold]  {data.name} {data.image_size[0]}x{data.image_size[1]} "
        f"(train {data.sizes()['train']}, val {data.sizes()['val']}, test {data.sizes()['test']})  "
        f"model {cfg.model.name}: {native_spec.integrator}, stages "
        f"{[(s.channels, s.layers) for s in native_spec.stages]}, {count_parameters(model)} parameters  "
        f"device {device}" + (f" x {env.world_size} processes" if env.enabled else "") + f"  run {run.path}"
        + (f"  [yellow]resumed from {ckpt['path']} at epoch {ckpt['epoch']}[/yellow]" if ckpt else "")
    )
    if len(schedule) > 1 or schedule[0].down:
        console.print("levels: " + " -> ".join(
            f"{lv.name} {data.image_size[0] >> lv.down}x{data.image_size[1] >> lv.down}"
            + (f" {lv.layers} layers" if lv.layers else "") + f" ({lv.epochs} ep)" for lv in schedule))

    ckpt_path = run.checkpoints / "last.pt"
    wall_before = history[-1]["wall_time_s"] if history else 0.0
    t0 = time.perf_counter()
    status, error = "completed", None
    last_good: Optional[int] = None
    epoch = history[-1]["epoch"] if history else 0
    level_summaries: List[Dict[str, Any]] = list(ckpt.get("levels", [])) if ckpt else []
    update: Optional[UpdateRule] = None
    cache: Dict[int, Any] = {}
    fits: Dict[str, Dict[str, float]] = {}  # level name -> its stencil fit (pyramid.stencils=fit)

    def data_at(down: int):
        if down not in cache:
            cache[down] = level_data(data, down, op, sigma)
        return cache[down]

    def checkpoint(li: int, level_epoch: int) -> None:
        if not env.is_main:
            return  # ranks > 0 hold the same weights; rank 0's file is the run's
        lv = schedule[li]
        save_checkpoint(ckpt_path, make_payload(
            model, cfg, epoch=epoch, level=lv.name, rule_state=update.state_dict(), rng=_rng_state(generator),
            history=history, position=(li, level_epoch), levels=level_summaries,
            schedule=[x.to_dict() for x in schedule]))

    try:
        with console.progress(bool(cfg.trainer.progress)) as progress:
            for li in range(start_level, len(schedule)):
                lv = schedule[li]
                first_epoch = start_level_epoch if li == start_level else 0
                if li > start_level:
                    model = move(model, schedule[li - 1], lv)
                d = data_at(lv.down)
                t_level = time.perf_counter()
                opt_cfg = cfg.optimizer if lv.lr is None else OmegaConf.merge(cfg.optimizer, {"lr": lv.lr})
                penalty = build_regularizer(model, cfg.regularizer)
                update = build_update(model, cfg, opt_cfg, lv.epochs, penalty)
                update = speed.prepare_update(update, model, cfg, env, device)  # DDP, bf16, compile: rebuilt per level
                if ckpt is not None and li == start_level and first_epoch < lv.epochs:
                    update.load_state_dict(ckpt)
                if cfg.trainer.get("eval_at_start") and first_epoch == 0 and d.sizes()["val"]:
                    val0 = evaluate(model, d.x_val, d.y_val, cfg.trainer.eval_batch_size)
                    record0 = {"epoch": epoch, "level": lv.name, "level_epoch": 0, "resolution": list(d.image_size),
                               "layers": model.depth(), "val_loss": val0["loss"], "val_acc": val0["acc"],
                               "wall_time_s": wall_before + time.perf_counter() - t0}
                    history.append(record0)
                    run.log_metrics(record0)
                size = f"{d.image_size[0]}x{d.image_size[1]}" + (f" {lv.layers}L" if lv.layers else "")
                for level_epoch in range(first_epoch + 1, lv.epochs + 1):
                    epoch += 1
                    n_batches = -(-d.sizes()["train"] // cfg.trainer.batch_size)
                    label = f"{lv.name} {size} " if len(schedule) > 1 else ""
                    task = progress.add_task(
                        f"{label}epoch {level_epoch}/{lv.epochs}", total=n_batches, loss="-", acc="-", ips="-"
                    )

                    def on_progress(done: int, loss: float, acc: float, ips: float, task=task) -> None:
                        progress.update(task, completed=done, loss=f"{loss:.4f}", acc=f"{acc:.2%}", ips=f"{ips:.0f}")
                        progress.refresh()

                    lr = update.lr
                    result = train_epoch(
                        model, update, d.x_train, d.y_train, cfg.trainer.batch_size, generator,
                        log_every=cfg.trainer.log_every, on_progress=on_progress, epoch=epoch,
                        on_step=run.log_step, shard=distributed.shard(env),
                    )
                    update.end_epoch()
                    val = evaluate(model, d.x_val, d.y_val, cfg.trainer.eval_batch_size) if d.sizes()["val"] else {}
                    progress.remove_task(task)
                    record = {
                        "epoch": epoch,
                        "level": lv.name,
                        "level_epoch": level_epoch,
                        "resolution": list(d.image_size),
                        "layers": model.depth(),
                        "train_loss": result.loss,
                        "train_acc": result.acc,
                        "val_loss": val.get("loss"),
                        "val_acc": val.get("acc"),
                        "lr": lr,
                        "epoch_time_s": result.seconds,
                        "samples_per_s": result.samples / result.seconds,
                        "wall_time_s": wall_before + time.perf_counter() - t0,
                        **update.epoch_stats(),
                    }
                    history.append(record)
                    run.log_metrics(record)
                    console.print(
                        f"{label}epoch {epoch:>3}  train loss {result.loss:.4f} acc {result.acc:.2%}  "
                        + (f"val loss {val['loss']:.4f} acc {val['acc']:.2%}  " if val else "")
                        + f"{result.seconds:.1f}s"
                    )
                    if level_epoch == lv.epochs:
                        level_summaries.append(_level_summary(lv, d, model, history, time.perf_counter() - t_level, cfg))
                        if lv.name in fits:
                            level_summaries[-1]["stencil_fit"] = fits[lv.name]
                    if level_epoch % cfg.trainer.checkpoint_every == 0 or level_epoch == lv.epochs:
                        checkpoint(li, level_epoch)
                        last_good = epoch
    except KeyboardInterrupt:
        status = "interrupted"
    except NonFiniteLoss as err:
        status, error = "failed", str(err)

    final: Dict[str, Any] = {}
    if status == "completed":
        last = level_summaries[-1] if level_summaries else {}
        final = {k: last[k] for k in ("val_loss", "val_acc", "test_loss", "test_acc") if last.get(k) is not None}
    best = max((r for r in history if r.get("val_acc") is not None and r.get("level") == schedule[-1].name
                and r.get("layers", model.depth()) == model.depth()),
               key=lambda r: r["val_acc"], default=None)
    summary: Dict[str, Any] = {
        "status": status,
        "epochs": epoch,
        **({f"final_{k}": v for k, v in final.items()}),
        "final_train_loss": history[-1].get("train_loss") if history else None,
        "final_train_acc": history[-1].get("train_acc") if history else None,
        "best_val_acc": best["val_acc"] if best else None,
        "best_val_epoch": best["epoch"] if best else None,
        "wall_time_s": wall_before + time.perf_counter() - t0,
        "setup_time_s": setup_s,
        "parameters": count_parameters(model),
        "device": str(device),
        "processes": env.world_size,
        "dataset": data.name,
        "level": schedule[-1].name,
        "resolution": list(model.spec.image_size),
        "depth": model.depth(),
        "levels": level_summaries,
        "data_sizes": data.sizes(),
        "checkpoint": str(ckpt_path) if ckpt_path.exists() else None,
        "resumed_from": ckpt["path"] if ckpt else None,
        "run_dir": str(run.path),
    }
    if error:
        summary["error"] = error
    run.write_summary(summary)

    console.print(records_table("epochs", history, columns_of(history, EPOCH_COLUMNS)))
    if len(schedule) > 1 and level_summaries:
        shown_levels = [{**lvs, **{k: f"{lvs[k]:.2%}" for k in ("val_acc", "test_acc") if lvs.get(k) is not None}}
                        for lvs in level_summaries]
        console.print(records_table("levels", shown_levels, LEVEL_COLUMNS))
    shown = {k: summary[k] for k in (
        "status", "epochs", "final_val_acc", "final_test_acc", "final_test_loss", "best_val_acc",
        "wall_time_s", "parameters", "device", "checkpoint") if summary.get(k) is not None}
    for k in ("final_val_acc", "final_test_acc", "best_val_acc"):
        if k in shown:
            shown[k] = f"{shown[k]:.2%}"
    console.print(key_value_table("summary", shown))
    console.save(run.path / "console.txt")

    if status == "failed":
        where = (f"the last good checkpoint is {ckpt_path} (epoch {last_good})" if last_good
                 else "no epoch finished, so no checkpoint was written")
        raise MsnetError(f"{error}; {where}; lower optimizer.lr or set trainer.grad_clip")
    if status == "interrupted":
        hint = f"msnet train resume={ckpt_path}" if ckpt_path.exists() else "a new run (no epoch had finished)"
        raise MsnetError(f"interrupted during epoch {epoch}; continue with: {hint}")
    return summary


def _level_summary(lv: Level, d: Any, model: torch.nn.Module, history: List[Dict[str, Any]], seconds: float,
                   cfg: DictConfig) -> Dict[str, Any]:
    """Accuracy and loss at the end of a level (validation from the last epoch, test measured now)."""
    last = history[-1]
    out = {"level": lv.name, "resolution": f"{d.image_size[0]}x{d.image_size[1]}", "layers": model.depth()[0],
           "epochs": lv.epochs,
           "val_loss": last.get("val_loss"), "val_acc": last.get("val_acc"), "time_s": seconds}
    if d.sizes()["test"]:
        m = evaluate(model, d.x_test, d.y_test, cfg.trainer.eval_batch_size)
        out["test_loss"], out["test_acc"] = m["loss"], m["acc"]
    return out


def _spec_diff(a: ModelSpec, b: ModelSpec) -> str:
    da, db = a.to_dict(), b.to_dict()
    diffs = [f"{k}: {da[k]} vs {db[k]}" for k in da if da[k] != db.get(k)]
    return "; ".join(diffs)[:200]

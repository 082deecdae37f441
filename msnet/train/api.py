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
from msnet.runs import RunConsole, RunDir, load_checkpoint, save_checkpoint
from msnet.runs.display import columns_of, key_value_table, records_table
from msnet.train.loop import NonFiniteLoss, evaluate, train_epoch
from msnet.train.optim import build_optimizer, build_scheduler
from msnet.train.setup import check_config, model_spec, resolve_dtype, resumed_config, set_seed

EPOCH_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s"]


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


def load_model_state(model: torch.nn.Module, ckpt: Dict[str, Any]) -> None:
    """Load a checkpoint's weights; a mismatch is one :class:`MsnetError` line."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:160]
        raise MsnetError(
            f"checkpoint {ckpt.get('path')} does not fit this model ({detail}); "
            "rebuild the model from the checkpoint (drop model overrides) or start a new run"
        ) from None


def train(
    cfg: DictConfig,
    run_dir: str | Path,
    overrides: Optional[List[str]] = None,
    console: Optional[RunConsole] = None,
    argv: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """Train one network as ``cfg`` says and write everything into ``run_dir``.

    ``overrides`` are the command-line overrides; with ``cfg.resume`` they say which
    keys replace the checkpoint's saved config. Returns the summary (also in
    ``run_dir/summary.json``). Raises :class:`MsnetError` for anything a person can fix.
    """
    console = console or RunConsole()
    run = RunDir(run_dir)
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        cfg = resumed_config(ckpt["config"], cfg, overrides)
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype)
    run.write_config(cfg)
    run.write_command(argv)

    t_setup = time.perf_counter()
    data = prepare_data(cfg.dataset, device, dtype)
    spec = model_spec(cfg.model, data)
    set_seed(int(cfg.seed))
    model = build_model(spec).to(device=device, dtype=dtype)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.optimizer, cfg.trainer.epochs)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    history: List[Dict[str, Any]] = []
    start_epoch = 0
    if ckpt is not None:
        saved = ModelSpec.from_dict(ckpt["model_spec"])
        if saved != spec:
            raise MsnetError(
                f"checkpoint {ckpt['path']} holds a different model ({_spec_diff(saved, spec)}); "
                "drop the model/dataset overrides to resume it, or start a new run"
            )
        load_model_state(model, ckpt)
        if ckpt.get("optimizer") is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt.get("scheduler") is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        _restore_rng(ckpt["rng"], generator)
        history = list(ckpt.get("history", []))
        start_epoch = int(ckpt["epoch"])
        if start_epoch >= cfg.trainer.epochs:
            raise MsnetError(
                f"checkpoint {ckpt['path']} already finished {start_epoch} epochs; "
                f"add trainer.epochs=N with N > {start_epoch} to train further"
            )
    run.reset_metrics(history)
    setup_s = time.perf_counter() - t_setup

    n_params = count_parameters(model)
    console.print(
        f"[bold]msnet train[/bold]  {data.name} {data.image_size[0]}x{data.image_size[1]} "
        f"(train {data.sizes()['train']}, val {data.sizes()['val']}, test {data.sizes()['test']})  "
        f"model {cfg.model.name}: {spec.integrator}, stages {[(s.channels, s.layers) for s in spec.stages]}, "
        f"{n_params} parameters  device {device}  run {run.path}"
        + (f"  [yellow]resumed from {ckpt['path']} at epoch {start_epoch}[/yellow]" if ckpt else "")
    )

    ckpt_path = run.checkpoints / "last.pt"
    wall_before = history[-1]["wall_time_s"] if history else 0.0
    t0 = time.perf_counter()
    status, error = "completed", None

    def checkpoint(epoch: int) -> None:
        save_checkpoint(
            ckpt_path,
            {
                "model_spec": spec.to_dict(),
                "model": model.state_dict(),
                "config": OmegaConf.to_container(cfg, resolve=True),
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": _rng_state(generator),
                "history": history,
                "resolution": list(data.image_size),
                "depth": model.depth(),
                "level": "single",
            },
        )

    last_good = None
    epoch = start_epoch
    try:
        with console.progress(bool(cfg.trainer.progress)) as progress:
            for epoch in range(start_epoch + 1, cfg.trainer.epochs + 1):
                n_batches = -(-data.sizes()["train"] // cfg.trainer.batch_size)
                task = progress.add_task(
                    f"epoch {epoch}/{cfg.trainer.epochs}", total=n_batches, loss="-", acc="-", ips="-"
                )

                def on_progress(done: int, loss: float, acc: float, ips: float, task=task) -> None:
                    progress.update(task, completed=done, loss=f"{loss:.4f}", acc=f"{acc:.2%}", ips=f"{ips:.0f}")
                    progress.refresh()

                lr = optimizer.param_groups[0]["lr"]
                result = train_epoch(
                    model, optimizer, data.x_train, data.y_train, cfg.trainer.batch_size, generator,
                    cfg.trainer.grad_clip, cfg.trainer.log_every, on_progress, epoch,
                )
                if scheduler is not None:
                    scheduler.step()
                val = evaluate(model, data.x_val, data.y_val, cfg.trainer.eval_batch_size) if data.sizes()["val"] else {}
                progress.remove_task(task)
                record = {
                    "epoch": epoch,
                    "level": "single",
                    "train_loss": result.loss,
                    "train_acc": result.acc,
                    "val_loss": val.get("loss"),
                    "val_acc": val.get("acc"),
                    "lr": lr,
                    "epoch_time_s": result.seconds,
                    "samples_per_s": result.samples / result.seconds,
                    "wall_time_s": wall_before + time.perf_counter() - t0,
                }
                history.append(record)
                run.log_metrics(record)
                console.print(
                    f"epoch {epoch:>3}  train loss {result.loss:.4f} acc {result.acc:.2%}  "
                    + (f"val loss {val['loss']:.4f} acc {val['acc']:.2%}  " if val else "")
                    + f"{result.seconds:.1f}s"
                )
                if epoch % cfg.trainer.checkpoint_every == 0 or epoch == cfg.trainer.epochs:
                    checkpoint(epoch)
                    last_good = epoch
    except KeyboardInterrupt:
        status = "interrupted"
    except NonFiniteLoss as err:
        status, error = "failed", str(err)

    final: Dict[str, Any] = {}
    if status == "completed":
        if history and history[-1].get("val_acc") is not None:
            final["val_loss"], final["val_acc"] = history[-1]["val_loss"], history[-1]["val_acc"]
        if len(data.y_test):
            m = evaluate(model, data.x_test, data.y_test, cfg.trainer.eval_batch_size)
            final["test_loss"], final["test_acc"] = m["loss"], m["acc"]
    best = max((r for r in history if r.get("val_acc") is not None), key=lambda r: r["val_acc"], default=None)
    summary: Dict[str, Any] = {
        "status": status,
        "epochs": history[-1]["epoch"] if history else 0,
        **({f"final_{k}": v for k, v in final.items()}),
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "final_train_acc": history[-1]["train_acc"] if history else None,
        "best_val_acc": best["val_acc"] if best else None,
        "best_val_epoch": best["epoch"] if best else None,
        "wall_time_s": wall_before + time.perf_counter() - t0,
        "setup_time_s": setup_s,
        "parameters": n_params,
        "device": str(device),
        "dataset": data.name,
        "resolution": list(data.image_size),
        "depth": model.depth(),
        "data_sizes": data.sizes(),
        "checkpoint": str(ckpt_path) if last_good is not None or (ckpt is not None) else None,
        "resumed_from": ckpt["path"] if ckpt else None,
        "run_dir": str(run.path),
    }
    if error:
        summary["error"] = error
    run.write_summary(summary)

    console.print(records_table("epochs", history, columns_of(history, EPOCH_COLUMNS)))
    shown = {k: summary[k] for k in (
        "status", "epochs", "final_val_acc", "final_test_acc", "final_test_loss", "best_val_acc",
        "wall_time_s", "parameters", "device", "checkpoint") if summary.get(k) is not None}
    for k in ("final_val_acc", "final_test_acc", "best_val_acc"):
        if k in shown:
            shown[k] = f"{shown[k]:.2%}"
    console.print(key_value_table("summary", shown))
    console.save(run.path / "console.txt")

    if status == "failed":
        where = f"the last good checkpoint is {ckpt_path} (epoch {last_good})" if last_good else "no epoch finished, so no checkpoint was written"
        raise MsnetError(f"{error}; {where}; lower optimizer.lr or set trainer.grad_clip")
    if status == "interrupted":
        hint = f"msnet train resume={ckpt_path}" if ckpt_path.exists() else "a new run (no epoch had finished)"
        raise MsnetError(f"interrupted during epoch {epoch}; continue with: {hint}", )
    return summary


def _spec_diff(a: ModelSpec, b: ModelSpec) -> str:
    da, db = a.to_dict(), b.to_dict()
    diffs = [f"{k}: {da[k]} vs {db[k]}" for k in da if da[k] != db.get(k)]
    return "; ".join(diffs)[:200]

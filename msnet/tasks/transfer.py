"""``transfer_checkpoint``: move a trained network to another resolution and measure what that buys.

For a checkpoint trained at level ``source`` and a ``target`` level of the same data it
writes the stencil-transferred network as a self-describing checkpoint and tabulates
validation and test accuracy at the target level for:

* ``stencil transfer``: Galerkin restriction / stencil prolongation of every 3x3 kernel
  and the classifier moved with R / P (:func:`msnet.multigrid.transfer_resolution`);
* ``naive kernel reuse``: the same kernels applied unchanged on the other grid (the
  classifier still moved with R / P, as its grid must change);
* ``resampled images``: the source network itself, on target images resampled
  bilinearly (antialiased when shrinking) to the source resolution: what one would
  otherwise do;
* ``stencil transfer, fitted``: the Galerkin network with every stencil and bias refitted, level
  by level, on ``fit_images`` training images so that both networks' pre-activations agree on
  the coarse grid (:func:`msnet.multigrid.fit_transfer`; ``model.residual=conv_act`` only).
  ``stencils=fit`` writes this network as the transferred checkpoint;
* ``native``: a network trained at the target level (``native=PATH``), when given;
* going to a finer level, also ``stencil transfer`` and ``naive kernel reuse`` on target images
  smoothed as the source level's images were (the Gaussian of each restriction, expressed in
  target pixels: :func:`source_smoothing`). The source network never saw the detail the
  finer images carry, and stencil prolongation amplifies it: the prolongation of a coarse
  identity stencil is a sharpening stencil with gain 9 on the finest (checkerboard) mode.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig

from msnet.errors import MsnetError
from msnet.config import check_known_keys
from msnet.data import prepare_data
from msnet.multigrid import (TIME_PROLONGATIONS, FitReport, check_stencil_transfer, data_for_size, fit_transfer,
                             gaussian_blur, level_data, level_name, parse_level, resample_images, restrict_images,
                             transfer_depth, transfer_resolution)
from msnet.multigrid.datafit import check_fittable, fit_sample
from msnet.runs import Restored, RunConsole, RunDir, make_payload, restore, save_checkpoint
from msnet.runs.display import records_table
from msnet.training.evaluation import evaluate


def find_latest_run(outputs: str | Path, level: str) -> Path:
    """The newest ``checkpoints/last.pt`` under ``outputs`` whose run finished at ``level``.

    ``level`` is a name (fine, coarse, ...) matched against each run's summary, or a
    pixel size matched against its resolution.
    """
    root = Path(outputs).expanduser()
    candidates = []
    for summary_path in root.rglob("summary.json") if root.is_dir() else []:
        ck = summary_path.parent / "checkpoints" / "last.pt"
        if not ck.is_file():
            continue
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            continue
        at = str(summary.get("level", "fine"))
        size = str((summary.get("resolution") or [None])[0])
        if str(level) in (at, size):
            candidates.append((ck.stat().st_mtime, ck))
    if not candidates:
        raise MsnetError(
            f"no run trained at level {level} under {root}; pass ckpt=PATH, or train one first "
            f"(msnet train level={level})"
        )
    return max(candidates)[1]


def split_metrics(model: torch.nn.Module, data: Any, splits: Any, batch_size: int,
                  transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, float]:
    """``{split_acc, split_loss}`` of ``model`` on each split of ``data`` (images passed through ``transform``)."""
    row: Dict[str, float] = {}
    for split in splits:
        x, y = data.split(str(split))
        m = evaluate(model, transform(x) if transform else x, y, int(batch_size))
        row[f"{split}_acc"], row[f"{split}_loss"] = m["acc"], m["loss"]
    return row


def source_smoothing(levels: int, sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Images ``levels`` levels finer than a source level, smoothed as the source level's were.

    Each restriction of the images is preceded by a Gaussian of std ``sigma`` pixels of the
    grid it is applied on: ``sigma * 2**i`` pixels of the finest grid for the i-th (i = 0, 1, ...).
    """

    def smooth(x: torch.Tensor) -> torch.Tensor:
        for i in range(levels):
            x = gaussian_blur(x, sigma * 2 ** i) if sigma > 0 else x
        return x

    return smooth


def _naive_reuse(source: torch.nn.Module, transferred: torch.nn.Module) -> torch.nn.Module:
    """``transferred`` with every kernel and bias replaced by the source's, unchanged."""
    naive = copy.deepcopy(transferred)
    state = naive.state_dict()
    for name, tensor in source.state_dict().items():
        if not name.startswith("classifier."):
            state[name] = tensor
    naive.load_state_dict(state)
    return naive


def _fitted_transfer(source: torch.nn.Module, data: Any, src_down: int, tgt_down: int, cfg: DictConfig,
                     required: bool) -> Tuple[Optional[torch.nn.Module], List[FitReport]]:
    """The data-fitted transfer, one level at a time on the same training images at every level.

    None (and no reports) for a model the fit does not support, unless ``required`` (``stencils=fit``),
    which then fails in one line.
    """
    try:
        check_fittable(source)
    except MsnetError:
        if required:
            raise
        return None, []
    if int(cfg.fit_images) < 1:
        raise MsnetError(f"fit_images must be at least 1, got {cfg.fit_images}")
    # only the sample is restricted, level by level (as level_data would restrict it)
    x = data.x_train[fit_sample(data.x_train.shape[0], cfg, 0).to(data.x_train.device)]
    step = -1 if src_down > tgt_down else 1
    net, fits, down = source, [], src_down
    while down != tgt_down:
        moved = transfer_resolution(net, -step, cfg.operator)
        here, there = (restrict_images(x, k, cfg.operator, float(cfg.sigma)) for k in (down, down + step))
        fits.append(fit_transfer(net, moved, here, there, cfg.operator, float(cfg.fit_ridge)))
        net, down = moved, down + step
    return net, fits


def transfer_checkpoint(cfg: DictConfig, run_dir: Optional[str | Path] = None,
                        console: Optional[RunConsole] = None) -> List[Dict[str, Any]]:
    """Transfer ``cfg.ckpt`` from level ``cfg.source`` to ``cfg.target``; returns the table rows."""
    console = console or RunConsole()
    check_known_keys(cfg)
    if cfg.get("source_depth") is not None or cfg.get("target_depth") is not None:
        return transfer_depth_checkpoint(cfg, run_dir, console)
    if cfg.source is None or cfg.target is None:
        raise MsnetError("say which levels: msnet transfer --from coarse --to fine ckpt=PATH")
    ckpt_path = cfg.ckpt
    if ckpt_path is None:
        ckpt_path = find_latest_run(cfg.outputs, cfg.source)
        console.print(f"using the latest run trained at level {cfg.source}: {ckpt_path}")
    src = restore(ckpt_path, cfg.device, cfg.get("threads"))
    source = src.model
    data = prepare_data(src.config.dataset, src.device, src.dtype)
    native = data.image_size
    src_down, tgt_down = parse_level(cfg.source, native), parse_level(cfg.target, native)
    src_size = (native[0] >> src_down, native[1] >> src_down)
    if tuple(source.spec.image_size) != src_size:
        at = source.spec.image_size
        raise MsnetError(
            f"checkpoint {src.path} is at {at[0]}x{at[1]}, not at --from {cfg.source} "
            f"({src_size[0]}x{src_size[1]}); pass the level it was trained at or another checkpoint"
        )
    if src_down == tgt_down:
        raise MsnetError(f"--from {cfg.source} and --to {cfg.target} are the same level; nothing to transfer")
    op, sigma = cfg.operator, float(cfg.sigma)
    stencils = check_stencil_transfer(str(cfg.get("stencils", "galerkin")))
    transferred = transfer_resolution(source, src_down - tgt_down, op)
    naive = _naive_reuse(source, transferred)
    target_data = level_data(data, tgt_down, op, sigma)
    tgt_size = target_data.image_size
    fitted, fits = _fitted_transfer(source, data, src_down, tgt_down, cfg, stencils == "fit")

    rows: List[Dict[str, Any]] = []

    def measure(method: str, model: torch.nn.Module,
                transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        rows.append({"method": method, **split_metrics(model, target_data, cfg.splits, cfg.batch_size, transform)})

    measure("stencil transfer", transferred)
    if fitted is not None:
        measure(f"stencil transfer, fitted on {fits[0].images} training images", fitted)
    measure("naive kernel reuse", naive)
    measure(f"resampled images -> {src_size[0]}x{src_size[1]}", source, lambda x: resample_images(x, src_size))
    if src_down > tgt_down:
        smooth = source_smoothing(src_down - tgt_down, sigma)
        measure("stencil transfer, smoothed images", transferred, smooth)
        measure("naive kernel reuse, smoothed images", naive, smooth)
    if cfg.native:
        native_net = restore(cfg.native, cfg.device)
        if tuple(native_net.model.spec.image_size) != tgt_size:
            at = native_net.model.spec.image_size
            raise MsnetError(
                f"native={native_net.path} is at {at[0]}x{at[1]}, not at the target level "
                f"{cfg.target} ({tgt_size[0]}x{tgt_size[1]}); pass a checkpoint trained at level={cfg.target}"
            )
        measure("native (trained at target)", native_net.model)

    src_name, tgt_name = level_name(src_down), level_name(tgt_down)
    console.print(
        f"[bold]msnet transfer[/bold]  {src.path}  {src_name} {src_size[0]}x{src_size[1]} -> "
        f"{tgt_name} {tgt_size[0]}x{tgt_size[1]} ({data.name}, operator {op})"
    )
    _print_rows(console, f"accuracy at {tgt_name} ({tgt_size[0]}x{tgt_size[1]})", rows, cfg.splits)
    if run_dir is not None:
        moved = fitted if stencils == "fit" else transferred
        origin = {"checkpoint": src.path, "level": src_name, "operator": op, "stencils": stencils}
        config = {**copy.deepcopy(src.ckpt["config"]), "level": tgt_name}
        _write_transfer(run_dir, cfg, src, moved, config, tgt_name, origin, console, {
            "checkpoint": src.path, "source": src_name, "target": tgt_name,
            "source_resolution": list(src_size), "target_resolution": list(tgt_size),
            "operator": op, "stencils": stencils, "native": str(cfg.native) if cfg.native else None,
            "stencil_fits": [f.to_dict() for f in fits], "results": rows,
        })
    return rows


def _print_rows(console: RunConsole, title: str, rows: List[Dict[str, Any]], splits: Any,
                first: Tuple[str, ...] = ("method",)) -> None:
    """The transfer table: one row per method, accuracy and loss per split."""
    columns = [*first, *[f"{s}_{m}" for s in splits for m in ("acc", "loss")]]
    shown = [{k: (f"{v:.2%}" if k.endswith("_acc") else v) for k, v in r.items()} for r in rows]
    console.print(records_table(title, shown, columns))


def _write_transfer(run_dir: str | Path, cfg: DictConfig, src: Restored, moved: torch.nn.Module, config: Dict[str, Any],
                    level: str, origin: Dict[str, Any], console: RunConsole, report: Dict[str, Any]) -> None:
    """Write the moved network as ``checkpoints/transferred.pt`` (with ``config``, the source's config at the
    new level or depth), the command's config, ``transfer.json`` (``report`` and that path) and the console."""
    run = RunDir(run_dir)
    out = save_checkpoint(run.checkpoints / "transferred.pt", make_payload(
        moved, config, epoch=src.ckpt["epoch"], level=level, rng=src.ckpt.get("rng", {}), transferred_from=origin))
    run.write_config(cfg)
    run.write_command()
    run.write_json("transfer.json", {**report, "transferred_checkpoint": str(out)})
    console.print(f"transferred checkpoint: {out}")
    console.save(run.path / "console.txt")


def transfer_depth_checkpoint(cfg: DictConfig, run_dir: Optional[str | Path] = None,
                              console: Optional[RunConsole] = None) -> List[Dict[str, Any]]:
    """Move ``cfg.ckpt`` from ``source_depth`` to ``target_depth`` layers per stage (T kept).

    Evaluates the network before and after, and after each registered prolongation (or
    the restriction, for a shallower target), at the checkpoint's own resolution, and
    writes the moved network as ``checkpoints/transferred.pt``.
    """
    console = console or RunConsole()
    if cfg.source_depth is None or cfg.target_depth is None:
        raise MsnetError("say both depths: msnet transfer --from-depth 8 --to-depth 16 ckpt=PATH")
    if cfg.ckpt is None:
        raise MsnetError("which network? add ckpt=PATH (e.g. a run's checkpoints/last.pt)")
    src = restore(cfg.ckpt, cfg.device, cfg.get("threads"))
    source = src.model
    depth = source.depth()
    if any(d != int(cfg.source_depth) for d in depth):
        raise MsnetError(
            f"checkpoint {src.path} has {depth} layers per stage, not --from-depth {cfg.source_depth}; "
            "pass the depth it was trained at"
        )
    m = int(cfg.target_depth)
    data = prepare_data(src.config.dataset, src.device, src.dtype)
    data = data_for_size(data, tuple(source.spec.image_size), src.config, f"checkpoint {src.path}")
    if m == int(cfg.source_depth):
        raise MsnetError(f"--from-depth and --to-depth are both {m}; nothing to transfer")
    operator = cfg.prolongation if m > depth[0] else cfg.restriction
    moved = transfer_depth(source, m, cfg.prolongation, cfg.restriction)
    candidates = [("before", f"{cfg.source_depth} layers", source), (f"after ({operator})", f"{m} layers", moved)]
    if m > depth[0]:
        for other in TIME_PROLONGATIONS.names():
            if other != cfg.prolongation:
                candidates.append((f"after ({other})", f"{m} layers", transfer_depth(source, m, other)))
    rows = [{"method": method, "layers": layers, **split_metrics(net, data, cfg.splits, cfg.batch_size)}
            for method, layers, net in candidates]
    console.print(f"[bold]msnet transfer[/bold]  {src.path}  {cfg.source_depth} -> {m} layers per stage "
                  f"(T kept; {data.name} {data.image_size[0]}x{data.image_size[1]})")
    _print_rows(console, "before and after the transfer in time", rows, cfg.splits, ("method", "layers"))
    if run_dir is not None:
        config = copy.deepcopy(src.ckpt["config"])
        config.setdefault("model", {})["layers"] = m
        _write_transfer(run_dir, cfg, src, moved, config, src.ckpt.get("level", "fine"),
                        {"checkpoint": src.path, "depth": depth, "operator": operator}, console,
                        {"checkpoint": src.path, "source_depth": depth, "target_depth": moved.depth(), "results": rows})
    return rows

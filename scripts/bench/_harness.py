"""What the benchmarks share: msnet's own level loop read as a trace of evaluations, runs advanced in
turns, the first evaluation at a target, and the Markdown, JSON and plot writers.

Every benchmark trains through :func:`msnet.training.fit.run_levels`, the generator ``msnet train``
drives, on a config composed as ``msnet train OVERRIDES`` composes it (:func:`msnet.config.compose_config`),
so a change to the trainer's per-level logic reaches the benchmarks too. What they time is
training only: each step's ``seconds`` (a chunk's batches; a level's move and stencil fit),
never the evaluations. With ``evals_per_epoch`` k > 1 the loop splits each epoch into k chunks
of a fresh random permutation and evaluates after each (:func:`msnet.training.fit.fit_level`).

The scripts run as ``python scripts/NAME.py``, which puts ``scripts/`` on ``sys.path``; they
import this file as ``_harness``.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig

from msnet.config import compose_config
from msnet.data import DataBundle
from msnet.training.fit import Step, epoch_batch_size, run_levels
from msnet.training.schedule import Schedule, build_schedule
from msnet.training.setup import check_config, model_spec
from msnet.training.state import RunState

Point = Dict[str, Any]


def train_config(overrides: Sequence[str]) -> DictConfig:
    """``msnet train OVERRIDES``'s config, composed from msnet's own config groups and checked as the trainer
    checks it before loading data (a bad value is one :class:`~msnet.MsnetError` line)."""
    cfg = compose_config(list(overrides))
    check_config(cfg)
    return cfg


def start(cfg: DictConfig, data: DataBundle, schedule: Optional[Schedule] = None) -> Tuple[RunState, Schedule]:
    """A new run of ``cfg`` on ``data`` as ``msnet train`` starts it: the schedule (``build_schedule``
    unless given) and :meth:`RunState.start` on ``data``'s device and dtype."""
    spec = model_spec(cfg.model, data)
    schedule = schedule or build_schedule(cfg, data.image_size, len(spec.stages))
    return RunState.start(cfg, spec, schedule, data.x_train.device, data.x_train.dtype), schedule


def chunk_images(n: int, evals_per_epoch: int) -> List[int]:
    """Images in each chunk of an epoch of ``n`` images split as :func:`~msnet.training.fit.fit_level` splits it
    (``torch.chunk`` of a permutation: fewer than ``evals_per_epoch`` chunks when ``n`` is small)."""
    return [n] if evals_per_epoch == 1 else [len(c) for c in torch.arange(n).chunk(evals_per_epoch)]


def chunk_batches(n: int, evals_per_epoch: int, batch_size: int) -> List[int]:
    """Mini-batches in each chunk of an epoch of ``n`` images (:func:`chunk_images`)."""
    return [-(-s // batch_size) for s in chunk_images(n, evals_per_epoch)]


def points(state: RunState, steps: Iterable[Step], n_train: int, batch_size: int | Callable[[int], int],
           evals_per_epoch: int = 1) -> Iterator[Point]:
    """The evaluations among the level loop's ``steps``, one point each, with the training clock.

    A point: ``kind`` (``"level"``: before a level's training, from ``trainer.eval_at_start``;
    ``"chunk"`` or ``"epoch"``), ``level`` (name), ``down`` (restrictions), ``layers`` (per stage),
    ``epoch`` (epochs over the run, fractional), ``level_epoch`` (epochs in this level),
    ``batches`` (mini-batches so far), ``batch`` (the mean images per mini-batch of the chunk the point ends: the
    mini-batch ``batch_size``, or ``batch_size(epoch)`` for a growing one, ``trainer.batch_growth``, less where the
    chunk's last batch is partial), ``train_s`` (training seconds so far: chunks, moves and
    stencil fits; evaluation excluded), ``val_acc``, ``val_loss``. Steps without an evaluation
    (a level step without ``eval_at_start``) only advance the clock.
    """
    batch_of = batch_size if callable(batch_size) else (lambda epoch: batch_size)
    clock, batches = 0.0, 0
    for step in steps:
        clock += step.seconds
        r = step.record
        size = batch_of(int(r["epoch"]) if step.kind != "level" else state.epoch + 1)
        images = chunk_images(n_train, evals_per_epoch)
        per_chunk = [-(-i // size) for i in images]
        c = r["chunk"] - 1 if step.kind == "chunk" else len(per_chunk) - 1
        batch = images[c] / per_chunk[c]
        if step.kind == "chunk":
            batches += per_chunk[r["chunk"] - 1]
            frac = r["chunk"] / len(per_chunk)
            epoch, level_epoch = r["epoch"] - 1 + frac, state.level_epoch + frac
        elif step.kind == "epoch":
            batches += per_chunk[-1]
            epoch, level_epoch = float(r["epoch"]), float(r["level_epoch"])
        else:
            epoch, level_epoch = float(state.epoch), 0.0
        if r.get("val_acc") is None:
            continue
        yield {"kind": step.kind, "level": step.level.name, "down": step.level.down,
               "layers": state.model.depth()[0], "epoch": epoch, "level_epoch": level_epoch, "batches": batches,
               "batch": batch,
               "train_s": clock, "val_acc": r["val_acc"], "val_loss": r["val_loss"]}


def run(cfg: DictConfig, data: DataBundle, evals_per_epoch: int = 1,
        schedule: Optional[Schedule] = None) -> Tuple[RunState, Iterator[Point]]:
    """``msnet train cfg`` on ``data`` as a generator of :func:`points` (started now, trained as it is
    iterated; stop iterating to stop the run). Returns the run's state too, to read its rule or model."""
    state, schedule = start(cfg, data, schedule)
    steps = run_levels(state, schedule, data, cfg, evals_per_epoch=evals_per_epoch, summaries=False)
    n = data.sizes()["train"]
    return state, points(state, steps, n, lambda epoch: epoch_batch_size(cfg.trainer, epoch, n), evals_per_epoch)


def interleave(*runs: Iterator[Any], on_step: Optional[Callable[[int, Any], None]] = None) -> None:
    """Advance ``runs`` in turns, one step each, until all are exhausted, so that noise from other
    work on the machine hits all alike. ``on_step(i, item)`` after each step of run ``i``."""
    active = list(enumerate(runs))
    while active:
        for entry in list(active):
            i, r = entry
            try:
                item = next(r)
            except StopIteration:
                active.remove(entry)
                continue
            if on_step is not None:
                on_step(i, item)


def first_hit(trace: Iterable[Point], target: float, key: str = "val_acc") -> Optional[Point]:
    """The first point of ``trace`` whose ``key`` is at or above ``target`` (None if there is none)."""
    return next((p for p in trace if p.get(key) is not None and p[key] >= target), None)


def markdown_table(rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]] = None) -> List[str]:
    """The lines of a Markdown table of ``rows`` (``columns``: default the first row's keys; None left blank)."""
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in columns) + " |" for r in rows]


def write_md_json(out: str | Path, name: str, markdown: Optional[Sequence[str]], data: Any) -> List[Path]:
    """Write ``out/NAME.md`` (the ``markdown`` lines; skipped if None) and ``out/NAME.json`` (``data``,
    indented); returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if markdown is not None:
        written.append(out / f"{name}.md")
        written[-1].write_text("\n".join(markdown) + "\n")
    written.append(out / f"{name}.json")
    written[-1].write_text(json.dumps(data, indent=1) + "\n")
    return written


def plot_curves(curves: Dict[str, Sequence[Point]], target: float, path: str | Path, title: str,
                axes: Sequence[Tuple[str, str]]) -> bool:
    """Validation accuracy (%) of each curve against each ``(key, label)`` of ``axes``, one panel each,
    with the target dashed; saved to ``path``. False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, panels = plt.subplots(1, len(axes), figsize=(5.5 * len(axes), 4.4), squeeze=False)
    # the lower limit ignores each curve's first fifth (the untrained start), so the race near the target shows
    low = min([100 * target] + [100 * p["val_acc"] for c in curves.values() for p in c[max(1, len(c) // 5):]])
    for ax, (key, label) in zip(panels[0], axes):
        for name, c in curves.items():
            ax.plot([p[key] for p in c], [100 * p["val_acc"] for p in c], "o-", ms=3, label=name)
        ax.axhline(100 * target, color="grey", ls="--", lw=0.8, label=f"target {100 * target:.2f}%")
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy (%)")
        ax.set_ylim(max(0.0, low - 2), None)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(textwrap.fill(title, 150), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


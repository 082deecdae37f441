"""The figures of one run, for its tracker (:mod:`msnet.runs.tracking`): drawn from what the run holds.

- ``levels``: validation accuracy and training loss against epoch, one colour per level, for a
  pyramid or depth schedule (a one-level run has no such figure);
- ``lm_k``: the learned LM coefficients k_n across the network's depth (``model.integrator=lm``),
  as ``scripts/reproduce/lu2018_table.py`` draws them for a whole study.

Needs matplotlib (``pip install 'msnet[plot]'``): :func:`run_figures` returns {} without it.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping

import torch

LM_KEY = re.compile(r"^blocks\.(\d+)\.params\.k$")


def lm_coefficients(state_dict: Mapping[str, torch.Tensor]) -> List[List[float]]:
    """k_n of every stage of an LM network (``blocks.<s>.params.k``, shape (N_s,)), stage by stage; [] for others."""
    found = {int(m.group(1)): v for k, v in state_dict.items() if (m := LM_KEY.match(k))}
    return [found[s].detach().flatten().tolist() for s in sorted(found)]


def run_figures(history: List[Dict[str, Any]], state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """name -> matplotlib figure for the figures this run has (see the module docstring); {} without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    figures: Dict[str, Any] = {}
    levels = list(dict.fromkeys(r["level"] for r in history if "level" in r))
    if len(levels) > 1:
        figures["levels"] = _levels_figure(plt, history, levels)
    k = lm_coefficients(state_dict)
    if k:
        figures["lm_k"] = _lm_figure(plt, k)
    return figures


def _levels_figure(plt: Any, history: List[Dict[str, Any]], levels: List[str]) -> Any:
    """Validation accuracy (left) and training loss (right) per epoch, one line per level."""
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name in levels:
        rows = [r for r in history if r.get("level") == name]
        label = f"{name} {rows[0]['resolution'][0]}x{rows[0]['resolution'][1]}, layers {rows[0]['layers']}"
        val = [(r["epoch"], r["val_acc"]) for r in rows if r.get("val_acc") is not None]
        train = [(r["epoch"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
        if val:
            acc.plot(*zip(*val), marker="o", label=label)
        if train:
            loss.plot(*zip(*train), marker="o", label=label)
    acc.set_xlabel("epoch")
    acc.set_ylabel("validation accuracy")
    loss.set_xlabel("epoch")
    loss.set_ylabel("training loss")
    acc.legend(fontsize=8)
    fig.suptitle("levels of the schedule")
    fig.tight_layout()
    return fig


def _lm_figure(plt: Any, k: List[List[float]]) -> Any:
    """k_n against the position s + (j + 1/2)/N_s of step j in stage s (dashed: stage boundaries)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs: List[float] = []
    ks: List[float] = []
    for s, stage in enumerate(k):  # a NaN between stages breaks the line at the boundary
        xs += [s + (j + 0.5) / len(stage) for j in range(len(stage))] + [float("nan")]
        ks += list(stage) + [float("nan")]
    ax.plot(xs, ks, marker="o", ms=3)
    for edge in range(1, len(k)):
        ax.axvline(edge, color="grey", ls="--", lw=0.8)
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("position in the network: stage + t/T")
    ax.set_ylabel("learned $k_n$ ($k_n = 0$: ResNet step)")
    fig.tight_layout()
    return fig

"""Runs: run directory, atomic self-describing checkpoints, metrics, progress display, reports."""

from msnet.runs.checkpoint import load_checkpoint, save_checkpoint
from msnet.runs.display import RunConsole
from msnet.runs.rundir import RunDir, read_metrics

__all__ = ["RunConsole", "RunDir", "load_checkpoint", "read_metrics", "save_checkpoint"]

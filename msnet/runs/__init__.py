"""Runs: run directory, atomic self-describing checkpoints, metrics, progress display, reports."""

from msnet.runs.checkpoint import (KEYS, Restored, load_checkpoint, load_network, make_payload, restore,
                                   save_checkpoint)
from msnet.runs.display import RunConsole
from msnet.runs.rundir import RunDir, read_metrics

__all__ = ["KEYS", "Restored", "RunConsole", "RunDir", "load_checkpoint", "load_network", "make_payload", "read_metrics",
           "restore", "save_checkpoint"]

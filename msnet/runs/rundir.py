"""The run directory: config, command line, metrics.jsonl, summary.json, console log, checkpoints."""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from omegaconf import DictConfig, OmegaConf

from msnet.runs.tracking import NullTracker, Tracker, save_state


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class RunDir:
    """One run's folder. Files:

    ``config.yaml`` (resolved config), ``command.txt`` (the command as typed),
    ``metrics.jsonl`` (one JSON record per epoch), ``steps.jsonl`` (per-iteration
    diagnostics of update rules that report them), ``summary.json``,
    ``console.txt`` (everything the run printed), ``checkpoints/``, and with a tracker
    ``tracking.json`` (which TensorBoard folder / MLflow run it feeds).

    ``tracker`` (:mod:`msnet.runs.tracking`): every record written here goes to it too, the
    one fan-out from a run to TensorBoard or MLflow; :meth:`close` ends it.
    """

    def __init__(self, path: str | Path, tracker: Optional[Tracker] = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"
        self.tracker: Tracker = tracker or NullTracker()

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, cfg: DictConfig | Dict[str, Any]) -> None:
        """Write the resolved config as ``config.yaml``."""
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(cfg)
        (self.path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        self.tracker.log_config(OmegaConf.to_container(cfg, resolve=True))

    def write_command(self, argv: Optional[List[str]] = None) -> None:
        """Write the command line that started the run as ``command.txt``."""
        argv = list(sys.argv if argv is None else argv)
        prog = "msnet " + Path(argv[0]).name.replace("msnet ", "") if argv else "msnet"
        (self.path / "command.txt").write_text(" ".join([prog, *map(shlex.quote, argv[1:])]) + "\n")

    def reset_metrics(self, records: Iterable[Dict[str, Any]] = ()) -> None:
        """Start ``metrics.jsonl`` afresh, with ``records`` (a resumed run's history) first; a tracker
        that does not continue the resumed run's tracked run gets them too."""
        with open(self.metrics_file, "w") as f:
            for r in records:
                f.write(json.dumps(_jsonable(r)) + "\n")
                if not self.tracker.resumed:
                    self.tracker.log_metrics(r)

    def log_metrics(self, record: Dict[str, Any]) -> None:
        """Append one record to ``metrics.jsonl`` (flushed at once, so a crash keeps it)."""
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
        self.tracker.log_metrics(record)

    def log_step(self, record: Dict[str, Any]) -> None:
        """Append one per-iteration record (an update rule's diagnostics) to ``steps.jsonl``."""
        with open(self.path / "steps.jsonl", "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
        self.tracker.log_step(record)

    def write_summary(self, summary: Dict[str, Any]) -> None:
        """Write ``summary.json`` (atomically: temp file then rename)."""
        tmp = self.path / ".summary.json.tmp"
        tmp.write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
        tmp.replace(self.path / "summary.json")
        self.tracker.log_summary(summary)

    def log_figure(self, name: str, figure: Any) -> None:
        """Hand a matplotlib figure to the tracker (the run directory keeps no figures of its own)."""
        self.tracker.log_figure(name, figure)

    def close(self) -> None:
        """Save the tracker's counters (``tracking.json``, for a resume) and end it."""
        save_state(self.tracker, self.path)
        self.tracker.close()

    def write_json(self, name: str, data: Dict[str, Any]) -> None:
        """Write ``data`` as the JSON file ``name`` in the run directory."""
        (self.path / name).write_text(json.dumps(_jsonable(data), indent=2) + "\n")


def read_metrics(path: str | Path) -> List[Dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file (a missing file gives [])."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

"""The run directory: config, command line, metrics.jsonl, summary.json, console log, checkpoints."""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

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
    one fan-out from a run to TensorBoard or MLflow; :meth:`close` ends it. The files come first
    and a tracker never stops the run: the first call that raises (a server gone, a full disk)
    is reported once through ``on_tracker_failure`` (one line; stderr unless the trainer sets it),
    kept as :attr:`tracker_failure` (``summary.json``'s ``tracker_error``), and the tracker gets
    nothing more.
    """

    def __init__(self, path: str | Path, tracker: Optional[Tracker] = None,
                 on_tracker_failure: Optional[Callable[[str], None]] = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"
        self.tracker: Tracker = tracker or NullTracker()
        self.tracker_failure: Optional[str] = None
        self.on_tracker_failure: Callable[[str], None] = on_tracker_failure or _warn_stderr

    @property
    def tracked(self) -> bool:
        """Whether records still go to a tracker (one was chosen, and it has not failed)."""
        return not isinstance(self.tracker, NullTracker) and self.tracker_failure is None

    def _track(self, method: str, *args: Any) -> None:
        """Call the tracker's ``method``; the first exception drops the tracker for the rest of the run."""
        if self.tracker_failure is not None:
            return
        try:
            getattr(self.tracker, method)(*args)
        except Exception as err:  # the run's own files hold everything; a tracker must not end the run
            text = str(err).strip()
            first = text.splitlines()[0][:200] if text else ""
            self.tracker_failure = (
                f"logger={self.tracker.name} failed in {method} ({type(err).__name__}{': ' + first if first else ''}); "
                f"msnet sends it nothing more, and the run's records stay whole in {self.path} (metrics.jsonl, "
                f"summary.json); check the tracker (logger.tracking_uri, the disk) or run with logger=none")
            self.on_tracker_failure(self.tracker_failure)

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, cfg: DictConfig | Dict[str, Any]) -> None:
        """Write the resolved config as ``config.yaml``."""
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(cfg)
        (self.path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        self._track("log_config", OmegaConf.to_container(cfg, resolve=True))

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
                    self._track("log_metrics", r)

    def log_metrics(self, record: Dict[str, Any]) -> None:
        """Append one record to ``metrics.jsonl`` (flushed at once, so a crash keeps it)."""
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
        self._track("log_metrics", record)

    def log_step(self, record: Dict[str, Any]) -> None:
        """Append one per-iteration record (an update rule's diagnostics) to ``steps.jsonl``."""
        with open(self.path / "steps.jsonl", "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
        self._track("log_step", record)

    def write_summary(self, summary: Dict[str, Any]) -> None:
        """Write ``summary.json`` (atomically: temp file then rename), with ``tracker_error`` when the
        tracker failed, also when it fails on the summary itself."""
        self._write_summary(summary)
        self._track("log_summary", summary)
        if self.tracker_failure is not None and "tracker_error" not in summary:
            self._write_summary(summary)

    def _write_summary(self, summary: Dict[str, Any]) -> None:
        if self.tracker_failure is not None:
            summary["tracker_error"] = self.tracker_failure
        tmp = self.path / ".summary.json.tmp"
        tmp.write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
        tmp.replace(self.path / "summary.json")

    def log_figure(self, name: str, figure: Any) -> None:
        """Hand a matplotlib figure to the tracker (the run directory keeps no figures of its own)."""
        self._track("log_figure", name, figure)
        if self.tracker_failure is not None:
            import matplotlib.pyplot as plt

            plt.close(figure)

    def close(self) -> None:
        """Save the tracker's counters (``tracking.json``, for a resume) and end it (a failed tracker is
        left as it is: ending an MLflow run on a server that is gone would retry for minutes)."""
        save_state(self.tracker, self.path)
        failed_before = self.tracker_failure is not None
        self._track("close")
        summary = self.path / "summary.json"
        if self.tracker_failure is not None and not failed_before and summary.is_file():
            self._write_summary(json.loads(summary.read_text()))

    def write_json(self, name: str, data: Dict[str, Any]) -> None:
        """Write ``data`` as the JSON file ``name`` in the run directory."""
        (self.path / name).write_text(json.dumps(_jsonable(data), indent=2) + "\n")


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_metrics(path: str | Path) -> List[Dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file (a missing file gives [])."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

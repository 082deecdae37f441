"""The run directory: config, command line, metrics.jsonl, summary.json, console log, checkpoints."""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from msnet.runs.tracking import AbstractTracker, data_facts, save_state, with_facts


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
    ``console.txt`` (everything the run printed), ``checkpoints/``, and with trackers
    ``tracking.json`` (which TensorBoard folder / MLflow run / W&B run each feeds).

    ``trackers`` (:mod:`msnet.runs.tracking`, ``logger=``): every record written here goes to each of them too,
    the one fan-out from a run to TensorBoard, MLflow and W&B; :meth:`close` ends them. The files come first
    and a tracker never stops the run: the first call that raises in one tracker (a server gone, a full disk)
    is reported once through ``on_tracker_failure`` (one line; stderr unless the trainer sets it), kept in
    :attr:`failures` (``summary.json``'s ``tracker_error``), and that tracker gets nothing more; the others
    go on.
    """

    def __init__(self, path: str | Path, trackers: Sequence[AbstractTracker] = (),
                 on_tracker_failure: Optional[Callable[[str], None]] = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"
        self.trackers: List[AbstractTracker] = list(trackers)
        self.failures: Dict[str, str] = {}  # tracker name -> its failure line, in the order they failed
        self.on_tracker_failure: Callable[[str], None] = on_tracker_failure or _warn_stderr

    @property
    def tracked(self) -> bool:
        """Whether records still go to a tracker (one was chosen, and not every one has failed)."""
        return any(t.name not in self.failures for t in self.trackers)

    @property
    def tracker_failure(self) -> Optional[str]:
        """The failed trackers' lines (``summary.json``'s ``tracker_error``), joined by `` | ``; None if none failed."""
        return " | ".join(self.failures.values()) or None

    def _track(self, method: str, *args: Any, fresh_only: bool = False) -> None:
        """Call ``method`` of every tracker that has not failed (``fresh_only``: of those that do not continue a
        resumed tracked run); the first exception of a tracker drops it for the rest of the run."""
        for tracker in self.trackers:
            if tracker.name in self.failures or (fresh_only and tracker.resumed):
                continue
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # the run's own files hold everything; a tracker must not end the run
                text = str(err).strip()
                first = text.splitlines()[0][:200] if text else ""
                what = f"{type(err).__name__}{': ' + first if first else ''}"
                line = (f"logger={tracker.name} failed in {method} ({what}); msnet sends it nothing more, and the run"
                        f"'s records stay whole in {self.path} (metrics.jsonl, summary.json); check the tracker "
                        f"({tracker.hint}) or run without it (logger=none: no tracker)")
                self.failures[tracker.name] = line
                self.on_tracker_failure(line)

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, cfg: DictConfig | Dict[str, Any], data: Any = None) -> None:
        """Write the resolved config as ``config.yaml``, and send it to the trackers with what the loaded ``data``
        (a :class:`~msnet.data.DataBundle`) says of the dataset keys only the synthetic generator reads
        (:func:`~msnet.runs.tracking.data_facts`: Fashion-MNIST's ``dataset.num_classes`` is 10, not the
        generator's 4); ``config.yaml`` keeps the config as composed."""
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(cfg)
        (self.path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        if self.trackers:
            config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
            self._track("log_config", with_facts(config, data_facts(data)) if data is not None else config)

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
                self._track("log_metrics", r, fresh_only=True)

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
        failed_before = len(self.failures)
        self._write_summary(summary)
        self._track("log_summary", summary)
        if len(self.failures) > failed_before:
            self._write_summary(summary)

    def _write_summary(self, summary: Dict[str, Any]) -> None:
        if self.tracker_failure is not None:
            summary["tracker_error"] = self.tracker_failure
        tmp = self.path / ".summary.json.tmp"
        tmp.write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
        tmp.replace(self.path / "summary.json")

    def log_figure(self, name: str, figure: Any) -> None:
        """Hand a matplotlib figure to every tracker, then close it (the run directory keeps no figures of its own)."""
        import matplotlib.pyplot as plt

        self._track("log_figure", name, figure)
        plt.close(figure)

    def close(self) -> None:
        """Save the trackers' counters (``tracking.json``, for a resume) and end each (a failed tracker is
        left as it is: ending an MLflow run on a server that is gone would retry for minutes)."""
        save_state(self.trackers, self.path)
        failed_before = len(self.failures)
        self._track("close")
        summary = self.path / "summary.json"
        if len(self.failures) > failed_before and summary.is_file():
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

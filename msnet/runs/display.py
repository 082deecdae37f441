"""What a run shows a person: a rich progress bar while it trains, tables when it ends.

Everything printed goes through one recording :class:`rich.console.Console`, and
:meth:`RunConsole.save` writes it to the run directory as ``console.txt``. On a terminal the
tables fit its width; written to a file or a pipe (a log, ``| tee``) they are printed in full,
not cut at rich's default of 80 columns.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

NOT_A_TERMINAL_WIDTH = 400
"""Columns of a console whose output is a file or a pipe: wider than any msnet table, so none is cut
(cells fold rather than end in an ellipsis even beyond it, see :func:`records_table`)."""


def console_width(file: Optional[TextIO] = None) -> Optional[int]:
    """The width (characters) for a console writing to ``file`` (stdout by default).

    ``None`` (rich's own choice, the terminal's width) on a terminal or when ``COLUMNS`` is set;
    :data:`NOT_A_TERMINAL_WIDTH` otherwise, where rich would assume 80 and cut the tables.
    """
    file = sys.stdout if file is None else file
    if os.environ.get("COLUMNS"):
        return None
    isatty = getattr(file, "isatty", None)
    return None if isatty is not None and isatty() else NOT_A_TERMINAL_WIDTH


class Survivable:
    """A text stream (stdout) whose loss does not end the run: the first write or flush that fails because the
    reader went away (``| head``: a broken pipe; a closed terminal: EIO) points the file descriptor at
    ``/dev/null`` and drops every later write. The run's files (``console.txt`` records everything) carry on."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.lost = False

    def _guard(self, method: str, *args: Any) -> Any:
        if self.lost:
            return len(args[0]) if args else None
        try:
            return getattr(self.stream, method)(*args)
        except (BrokenPipeError, ConnectionResetError, OSError) as err:
            if not isinstance(err, (BrokenPipeError, ConnectionResetError)) and err.errno not in (errno.EIO, errno.EPIPE):
                raise
            self.lost = True
            try:  # so that the interpreter's own flush at exit finds a writable descriptor
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.stream.fileno())
                os.close(devnull)
            except (OSError, ValueError, AttributeError):
                pass
            return len(args[0]) if args else None

    def write(self, text: str) -> int:
        return self._guard("write", text)

    def flush(self) -> None:
        self._guard("flush")

    def isatty(self) -> bool:
        return not self.lost and self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", "utf-8")


class RunConsole:
    """A recording console (stdout, :class:`Survivable`) plus a progress-bar factory."""

    def __init__(self, quiet: bool = False):
        self.console = Console(file=Survivable(sys.stdout), record=True, quiet=quiet, highlight=False,
                               soft_wrap=False, width=console_width())

    def print(self, *args: Any, **kwargs: Any) -> None:
        self.console.print(*args, **kwargs)

    def error(self, message: str) -> None:
        """Print one red line to stderr (and record it)."""
        self.console.print(f"[red]error:[/red] {message}", highlight=False)
        if not self.console.file.isatty():
            print(f"error: {message}", file=sys.stderr)

    def progress(self, enabled: bool = True) -> Progress:
        """A progress bar with epoch, batches, loss, accuracy and throughput.

        It refreshes only when the trainer calls ``refresh`` (no background
        thread competing with training for the two CPU cores).
        """
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("acc {task.fields[acc]}"),
            TextColumn("{task.fields[ips]} img/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            auto_refresh=False,
            transient=True,
            disable=not enabled,
        )

    def save(self, path: str | Path) -> None:
        """Write everything printed so far to ``path`` as plain text."""
        Path(path).write_text(self.console.export_text(clear=False))


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats rounded, percentages for accuracies in [0, 1] left to the caller."""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3) else f"{value:.{digits}f}"
    return "" if value is None else str(value)


def typed(value: Any) -> str:
    """A config value as one would type it, never rounded: ``3e-05``, ``0.00012``, ``true``; None left blank."""
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def records_table(title: str, records: Sequence[Dict[str, Any]], columns: Sequence[str],
                  exact: Sequence[str] = ()) -> Table:
    """A table with one row per record and the given columns (missing values left blank); the ``exact``
    columns (config values) are shown as they are, never rounded.

    Cells fold onto a second line rather than end in an ellipsis when the console is too narrow.
    """
    table = Table(title=title, show_lines=False)
    for c in columns:
        justify = "left" if c in ("run", "level", "split", "method", "resolution", "status") else "right"
        table.add_column(c, justify=justify, overflow="fold")
    for r in records:
        table.add_row(*((typed if c in exact else fmt)(r.get(c)) for c in columns))
    return table


def key_value_table(title: str, items: Dict[str, Any]) -> Table:
    """A two-column table of a summary."""
    table = Table(title=title, show_header=False)
    table.add_column("key", style="bold", overflow="fold")
    table.add_column("value", overflow="fold")
    for k, v in items.items():
        table.add_row(k, fmt(v))
    return table


def columns_of(records: Iterable[Dict[str, Any]], preferred: List[str]) -> List[str]:
    """``preferred`` columns that occur in any record, in that order."""
    present = set().union(*(r.keys() for r in records)) if records else set()
    return [c for c in preferred if c in present]

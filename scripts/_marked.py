"""A page's generated section: the text between two HTML-comment markers, read and rewritten in place.

Shared by the scripts that write parts of ``docs/`` (``config_reference.py``, ``error_reference.py``,
``gpu_check.py --publish``), so that how a section is found, compared and replaced is written once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple


@dataclass(frozen=True)
class MarkedSection:
    """The section of ``page`` between ``begin`` and ``end``; ``tool`` names the script in its messages."""

    page: Path
    begin: str
    end: str
    tool: str

    def split(self, text: Optional[str] = None) -> Tuple[str, str, str]:
        """(before ``begin``, between the markers, after ``end``) of ``text`` (default: the page's text).

        A page without both markers ends the script with one line naming them.
        """
        text = self.page.read_text() if text is None else text
        if self.begin not in text or self.end not in text:
            raise SystemExit(f"{self.tool}: {self.page} lacks the markers {self.begin} / {self.end}")
        head, rest = text.split(self.begin, 1)
        inside, tail = rest.split(self.end, 1)
        return head, inside, tail

    def current(self, text: Optional[str] = None) -> str:
        """What stands between the markers, without its surrounding blank lines, ending in one newline."""
        return self.split(text)[1].strip("\n") + "\n"

    def replace(self, body: str) -> None:
        """Put ``body`` (ending in a newline) between the markers; the rest of the page stays as it is."""
        head, _, tail = self.split()
        self.page.write_text(f"{head}{self.begin}\n{body}{self.end}{tail}")

    def update(self, body: str, check: bool) -> int:
        """``--check``: exit status 1 (and one line) if the page's section differs from ``body``;
        otherwise write ``body`` into it. Returns the exit status."""
        if check:
            if self.current() != body:
                print(f"{self.tool}: {self.page} is out of date; run scripts/{self.tool}.py", file=sys.stderr)
                return 1
            return 0
        self.replace(body)
        print(f"{self.tool}: wrote {self.page}")
        return 0

"""Progress reporting: a rich bar on a terminal, a plain line every few seconds otherwise (logs, CI).

Library code calls `task = progress(...)` and `task.advance(n)`; it never prints directly, so that
commands stay quiet under `--quiet` and logs stay readable when output is not a terminal. Under
`torchrun` only the process of rank 0 (the RANK variable torchrun sets) shows progress and status
lines: N processes would otherwise print N copies of each.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

console = Console(stderr=True)
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def _silent() -> bool:
    """--quiet, or a process other than rank 0 under torchrun."""
    return _quiet or os.environ.get("RANK", "0") != "0"


def say(message: str) -> None:
    """A status line for the user (stderr, so stdout stays clean for --json output)."""
    if not _silent():
        # soft_wrap: the line is never broken by rich (a log's 80 columns would split a path or a
        # command to copy); a terminal wraps it where it must.
        console.print(message, highlight=False, soft_wrap=True)


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and `noun`, plural when n != 1: count(1, "problem") -> "1 problem"; "3 problems"
    (`plural` for nouns that do not just add an s)."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def rate_text(done: float, seconds: float, unit: str) -> str:
    """"120 images/s", or "3.2 s/step" when one unit takes longer than a second (a rate under 1
    would round to 0)."""
    rate = done / max(seconds, 1e-9)
    if rate >= 1 or done == 0:
        return f"{rate:,.0f} {unit}/s"
    return f"{seconds / done:,.1f} s/{unit.removesuffix('s')}"


class _Task:
    def __init__(self, total: int, desc: str, unit: str, bar: Progress | None, every_s: float):
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.extra = ""
        self._bar, self._every_s = bar, every_s
        self._t0 = self._last = time.monotonic()
        self._id = bar.add_task(desc, total=total, extra="") if bar else None

    def advance(self, n: int = 1, extra: str | None = None) -> None:
        self.done += n
        if extra is not None:
            self.extra = extra
        if self._bar is not None:
            self._bar.update(self._id, advance=n, extra=self.extra)
            return
        now = time.monotonic()
        if not _silent() and (now - self._last >= self._every_s or self.done >= self.total):
            self._last = now
            print(f"{self.desc}: {self.done}/{self.total} {self.unit} "
                  f"({rate_text(self.done, now - self._t0, self.unit)})"
                  f"{' ' + self.extra if self.extra else ''}", file=sys.stderr, flush=True)


@contextmanager
def progress(total: int, desc: str, unit: str = "items", every_s: float = 10.0) -> Iterator[_Task]:
    if _silent() or not console.is_terminal:
        yield _Task(total, desc, unit, None, every_s)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TaskProgressColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[extra]}"))
    with Progress(*columns, console=console, transient=False) as bar:
        yield _Task(total, desc, unit, bar, every_s)

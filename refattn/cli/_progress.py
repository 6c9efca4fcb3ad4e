"""The live progress bar of long commands (``rich``), on stderr, only on a terminal.

It shows the count, elapsed time, an ETA and what is running now (``sdpa numba
float32: first call, compiles the kernels if not cached``).  Finished rows are
written with :meth:`Progress.emit`, which prints above the bar on a terminal and
plainly (flushed at once) when the output is a file or a pipe.
"""

from __future__ import annotations

import sys

import datetime

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress as _RichProgress,
                           ProgressColumn, TextColumn, TimeElapsedColumn)
from rich.text import Text

__all__ = ["Progress", "eta_seconds"]


def eta_seconds(elapsed: float, done: float, total: float):
    """Seconds left at the mean pace so far, ``None`` before the first step.

    >>> eta_seconds(30.0, 3, 12)
    90.0
    >>> eta_seconds(5.0, 0, 12) is None
    True
    """
    if not done or elapsed is None:
        return None
    return elapsed / done * max(total - done, 0)


class _EtaColumn(ProgressColumn):
    """``ETA h:mm:ss`` from the mean time per finished step (steps take seconds to minutes,
    longer than rich's own 30 s speed window)."""

    def render(self, task) -> Text:
        left = eta_seconds(task.elapsed, task.completed, task.total)
        text = "-:--:--" if left is None else str(datetime.timedelta(seconds=int(left)))
        return Text(f"ETA {text}", style="progress.remaining")


class Progress:
    """A context manager: ``with Progress(total, "checking") as bar: bar.advance()``.

    Parameters
    ----------
    total : int
        Number of steps.
    label : str
        What the steps are ("checking", "studies").
    console : rich.console.Console, optional
        Where the bar is drawn (default: stderr).  The bar is drawn only when it
        is a terminal.
    """

    def __init__(self, total: int, label: str, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.enabled = self.console.is_terminal
        self._bar = _RichProgress(
            TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TimeElapsedColumn(), _EtaColumn(),
            TextColumn("{task.fields[what]}"),
            console=self.console, transient=True, disable=not self.enabled,
            redirect_stdout=False, redirect_stderr=False)
        self._task = self._bar.add_task(label, total=total, what="")

    def __enter__(self) -> "Progress":
        self._bar.start()
        return self

    def __exit__(self, *exc):
        self._bar.stop()
        return False

    def doing(self, what: str):
        """Show what runs now."""
        self._bar.update(self._task, what=what)
        if self.enabled:
            self._bar.refresh()

    def advance(self):
        """One step done."""
        self._bar.advance(self._task)

    def emit(self, line: str = ""):
        """Print a finished row on stdout, above the bar when both are on a terminal."""
        if self.enabled and sys.stdout.isatty():
            self._bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, flush=True)

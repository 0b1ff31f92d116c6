"""Terminal output shared by the command-line tools: tables and progress bars (rich)."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Scripts and CI capture the output: give tables room instead of rich's 80-column default.
_console = Console(width=None if sys.stdout.isatty() else 140)
_stderr = Console(stderr=True)


def console(message: str) -> None:
    """Print one line to standard output."""
    _console.print(message, highlight=False, soft_wrap=True)


def table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    """Print a table; numeric-looking columns are right-aligned."""
    t = Table(title=title, title_justify="left", show_lines=False)
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i == 0 else "right", overflow="fold")
    for r in rows:
        t.add_row(*r)
    _console.print(t)


@contextmanager
def progress_bar(description: str, total: int):
    """Yield an ``advance()`` callable; the bar goes to stderr and only on a terminal."""
    if not sys.stderr.isatty():
        yield lambda n=1: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=_stderr, transient=True) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)

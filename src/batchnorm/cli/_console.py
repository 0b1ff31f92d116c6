"""The one way the commands print: lines, tables and progress.

``rich`` draws them when it is installed (the ``cli`` extra); without it the same calls print
plain text, so every command works with the core dependencies alone. Tables and lines go to
standard output; progress goes to standard error, and only on a terminal.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

try:
    from rich.console import Console
except ImportError:  # plain text
    Console = None

# Scripts and CI capture the output: give tables room instead of rich's 80-column default.
_stdout = None if Console is None else Console(width=None if sys.stdout.isatty() else 160)
_stderr = None if Console is None else Console(stderr=True)


def console(message: str) -> None:
    """Print one line to standard output."""
    if _stdout is None:
        print(message, flush=True)
    else:
        _stdout.print(message, highlight=False, soft_wrap=True, markup=False)


def table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    """Print a table; the first column is left-aligned, the others right-aligned."""
    if _stdout is None:
        print(plain_table(title, headers, rows), flush=True)
        return
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_lines=False)
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i == 0 else "right", overflow="fold")
    for r in rows:
        t.add_row(*r)
    _stdout.print(t)


def plain_table(title: str, headers: list[str], rows: list[list[str]]) -> str:
    """The table as aligned plain text (what :func:`table` prints without rich)."""
    cells = [list(map(str, headers)), *[list(map(str, r)) for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([title, line(cells[0]), rule, *map(line, cells[1:])])


@contextmanager
def progress_bar(description: str, total: int):
    """Yield ``advance(n=1, description=None)``; the bar goes to stderr, only on a terminal.

    Without rich, a terminal gets one ``description i/total`` line per step instead.
    """
    if not sys.stderr.isatty():
        yield lambda n=1, description=None: None
        return
    if _stderr is None:
        done = [0]

        def advance(n=1, description=None):
            done[0] += n
            print(f"{description or ''} {done[0]}/{total}", file=sys.stderr, flush=True)

        yield advance
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=_stderr, transient=True) as p:
        task = p.add_task(description, total=total)

        def advance(n=1, description=None):
            if description is not None:
                p.update(task, description=description)
            p.advance(task, n)

        yield advance

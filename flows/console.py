"""Console helpers for the CLI: stdout for results, stderr for progress and errors."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

from rich.console import Console


@cache
def out_console() -> Console:
    # wide when piped (logs, CI) so paths and messages are not cut
    return Console(soft_wrap=False, highlight=False, width=None if sys.stdout.isatty() else 160)


@cache
def err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


@contextmanager
def progress_for(description: str, total: int | None, *, unit: str = "rows", enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr when it is a terminal; a no-op otherwise (CI, pipes, --json)."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                  TimeElapsedColumn(), console=err_console(), transient=True) as prog:
        task = prog.add_task(description, total=None)
        yield lambda n: prog.advance(task, n)

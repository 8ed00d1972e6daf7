"""Progress bars (rich) on stderr for work that takes seconds; silent when stderr is not a terminal."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.console import Console

T = TypeVar("T")
_console = Console(stderr=True)


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
    """Iterate `items` with a progress bar (ETA included) when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=_console, transient=True) as bar:
        yield from bar.track(items, total=total, description=description)


def note(message: str) -> None:
    """One line of what a long job is doing now, on stderr, in brackets like the CLI's other notes."""
    print(f"[{message}]", file=sys.stderr, flush=True)

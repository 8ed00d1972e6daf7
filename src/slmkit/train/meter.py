"""What a user sees while a model trains: a rich progress bar (step, loss, learning rate, tokens/s, ETA) on a
terminal, or one log line every `log_every` steps on stderr when it is not one."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Meter:
    def __init__(self, total: int, start: int, show: bool, log_every: int = 10):
        self.total, self.start, self.show, self.log_every = total, start, show, log_every
        self.tty = show and sys.stderr.isatty()
        self.bar, self.task, self.t0 = None, None, time.perf_counter()

    def __enter__(self) -> "Meter":
        if self.tty:
            columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                       TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
            self.bar = Progress(*columns, console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task("train", total=self.total, completed=self.start, stats="")
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        stats = f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, stats=stats)
        elif self.show and (step % self.log_every == 0 or step == self.total):
            done = step - self.start
            eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
            print(f"[step {step}/{self.total}  {stats}  eta {eta:.0f} s]", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)
        elif self.show:
            print(f"[{text}]", file=sys.stderr, flush=True)

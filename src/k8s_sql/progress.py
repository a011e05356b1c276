"""How ``k8s-sql migrate`` shows its progress: a rich progress bar (rows, rows per
second, time left) on a terminal, plain lines otherwise (a log keeps them readable)."""

from __future__ import annotations

import sys
import time

from k8s_sql.migrate import Progress

LINE_SECONDS = 5.0  # at most one plain line per table this often


class Bar(Progress):
    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress as RichProgress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        self.rich = RichProgress(
            TextColumn("{task.description:>6}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]:>10} rows/s"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.rich.start()
        self.task: object = None
        self.started = time.monotonic()

    def note(self, line: str) -> None:
        self.rich.console.print(line)

    def table(self, name: str, total: int) -> None:
        self.task = self.rich.add_task(name, total=max(total, 1), rate="")
        self.started = time.monotonic()

    def advance(self, rows: int) -> None:
        task = self.rich.tasks[-1]
        rate = (task.completed + rows) / max(time.monotonic() - self.started, 1e-6)
        self.rich.update(task.id, advance=rows, rate=f"{rate:,.0f}")

    def done(self) -> None:
        self.rich.stop()


class Lines(Progress):
    def __init__(self) -> None:
        self.name, self.total, self.copied = "", 0, 0
        self.started = self.shown = 0.0

    def note(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def table(self, name: str, total: int) -> None:
        if self.name:
            self._line()
        self.name, self.total, self.copied = name, total, 0
        self.started = self.shown = time.monotonic()

    def advance(self, rows: int) -> None:
        self.copied += rows
        if time.monotonic() - self.shown >= LINE_SECONDS:
            self._line()

    def _line(self) -> None:
        took = max(time.monotonic() - self.started, 1e-6)
        rate = self.copied / took
        left = (self.total - self.copied) / rate if rate else 0.0
        print(
            f"{self.name}: {self.copied}/{self.total} rows, {rate:,.0f} rows/s, {left:.0f} s left",
            file=sys.stderr,
            flush=True,
        )
        self.shown = time.monotonic()

    def done(self) -> None:
        if self.name:
            self._line()
            self.name = ""


def for_terminal_or_log() -> Progress:
    return Bar() if sys.stderr.isatty() else Lines()

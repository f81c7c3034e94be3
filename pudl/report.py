"""What a run tells the user: metrics.jsonl rows, summary.json, and the rich live display."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from pudl.atomic_files import dumps


class Reporter:
    """Writes metrics rows to the run directory and shows progress bars per phase."""

    def __init__(self, run_dir: Path | None, console: Console | None = None, quiet: bool = False):
        self.run_dir = run_dir  # None: show progress only, write nothing
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.metrics_path = run_dir / "metrics.jsonl" if run_dir else None
        self.phase_seconds: dict[str, float] = {}

    def log(self, kind: str, **fields):
        """Append one metrics row (kind = step | round | phase | eval | teacher)."""
        if self.metrics_path is None:
            return
        row = {"kind": kind, "time": round(time.time(), 3), **fields}
        fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(dumps(row) + "\n")

    def say(self, message: str):
        if not self.quiet:
            self.console.print(message)

    @contextlib.contextmanager
    def phase(self, name: str, total: int, round_: int | None = None):
        """A progress bar for one phase; yields advance(n=1). Wall time is recorded per phase."""
        label = f"round {round_} · {name}" if round_ is not None else name
        t0 = time.perf_counter()
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                            disable=self.quiet, transient=False)
        with progress:
            task = progress.add_task(label, total=max(total, 0))
            yield lambda n=1: progress.advance(task, n)
        seconds = time.perf_counter() - t0
        self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + seconds
        self.log("phase", phase=name, round=round_, seconds=round(seconds, 3), items=total)

    def table(self, title: str, rows: list[tuple], columns: tuple[str, ...]):
        if self.quiet:
            return
        table = Table(title=title)
        for c in columns:
            table.add_column(c)
        for r in rows:
            table.add_row(*[_fmt(x) for x in r])
        self.console.print(table)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3f}"
    return "" if x is None else str(x)

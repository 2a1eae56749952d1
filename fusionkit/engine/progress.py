"""Rich progress bars (step, epoch, ETA, clips/s, loss, lr), log lines and summary tables (rank 0).

On a terminal a live bar shows the run; elsewhere (logs, CI, tests) one plain line is printed every
``log_every`` steps instead. Other ranks print nothing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class Reporter:
    """Progress and log output of one run.

    Args:
        total: steps (or batches) of the whole run.
        title: bar description.
        enabled: print anything (rank 0).
        live: a live bar (default: when the console is a terminal).
        console: rich console (default: stdout).
    """

    def __init__(self, total: int, title: str, enabled: bool = True, live: bool | None = None,
                 console: Console | None = None, completed: int = 0) -> None:
        self.console = console or Console()
        self.enabled = enabled
        self.live = enabled and (self.console.is_terminal if live is None else live)
        self.start = time.perf_counter()
        self.clips = 0
        self.progress: Progress | None = None
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("epoch {task.fields[epoch]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), TextColumn("{task.fields[speed]} clips/s"),
                TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                console=self.console, transient=False)
            self.task = self.progress.add_task(title, total=total, completed=completed, epoch="-", speed="-",
                                               loss="-", lr="-")
            self.progress.start()

    def speed(self) -> float:
        return self.clips / max(time.perf_counter() - self.start, 1e-9)

    def update(self, advance: int = 1, clips: int = 0, **fields: Any) -> None:
        self.clips += clips
        if self.progress is not None:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in fields.items()}
            self.progress.update(self.task, advance=advance, speed=f"{self.speed():.1f}", **shown)

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(message)
        else:
            self.console.print(message, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def table(self, title: str, rows: Mapping[str, Any]) -> None:
        if self.enabled:
            self.console.print(summary_table(title, rows))


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def summary_table(title: str, rows: Mapping[str, Any]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("", style="bold cyan", no_wrap=True)
    table.add_column("value", justify="right")
    for key, value in rows.items():
        table.add_row(str(key), fmt(value))
    return table

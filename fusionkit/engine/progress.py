"""Rich progress bars (step, epoch, ETA, clips/s, loss, lr), log lines and summary tables (rank 0).

On a terminal a live bar shows the run; elsewhere (logs, CI, tests) one plain line is printed every
``log_every`` steps instead. Other ranks print nothing. A bar shows only the fields of its own kind
of work: training shows epoch, loss and lr; evaluation (``fusionkit eval``, validation inside
``train``: a second bar under the training bar while it runs) shows batches, time and clips/s.

With a :class:`~fusionkit.engine.run_folder.LogFile` every log line and table also goes, as plain
text (no markup, no colours), to the run's ``train.log``; :meth:`Reporter.record` writes a line to
that file only (the training steps a live bar shows instead of printing them).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

TRAIN_FIELDS = ("epoch", "loss", "lr")  # the fields of the training bar, beside clips/s
LABELS = {"epoch": "epoch {}", "speed": "{} clips/s", "loss": "loss {}", "lr": "lr {}"}


class FieldColumn(ProgressColumn):
    """``template`` filled with one field of a task; empty for a task without that field (an evaluation
    task has no loss or lr)."""

    def __init__(self, field: str, template: str) -> None:
        super().__init__()
        self.field, self.template = field, template

    def render(self, task: Task) -> Text:
        if self.field not in task.fields:
            return Text("")
        return Text(self.template.format(task.fields[self.field]))


class SubBar:
    """A second bar of a :class:`Reporter` (validation inside training): batches and clips/s only."""

    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self.progress, self.task = progress, task
        self.start, self.clips = time.perf_counter(), 0

    def update(self, clips: int = 0) -> None:
        self.clips += clips
        if self.progress is not None and self.task is not None:
            speed = self.clips / max(time.perf_counter() - self.start, 1e-9)
            self.progress.update(self.task, advance=1, speed=f"{speed:.1f}")

    def close(self) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None


class Reporter:
    """Progress and log output of one run.

    Args:
        total: steps (or batches) of the whole run.
        title: bar description.
        enabled: print anything (rank 0).
        live: a live bar (default: when the console is a terminal).
        console: rich console (default: stdout).
        completed: steps already done (a resumed run).
        fields: the bar's fields beside clips/s (default the training fields ``epoch``, ``loss``,
            ``lr``; ``()`` for an evaluation).
        log_file: the run's ``train.log`` (:class:`~fusionkit.engine.run_folder.LogFile`), or None.
    """

    def __init__(self, total: int, title: str, enabled: bool = True, live: bool | None = None,
                 console: Console | None = None, completed: int = 0, fields: Sequence[str] = TRAIN_FIELDS,
                 log_file: Any = None) -> None:
        self.console = console or Console()
        self.enabled = enabled
        self.live = enabled and (self.console.is_terminal if live is None else live)
        self.log_file = log_file if enabled else None
        self.start = time.perf_counter()
        self.clips = 0
        self.fields = tuple(fields)
        self.progress: Progress | None = None
        if self.live:
            columns: list[ProgressColumn] = [TextColumn("[bold]{task.description}"), BarColumn(),
                                             MofNCompleteColumn()]
            if "epoch" in self.fields:
                columns.append(FieldColumn("epoch", LABELS["epoch"]))
            columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        FieldColumn("speed", LABELS["speed"])]
            columns += [FieldColumn(f, LABELS.get(f, f + " {}")) for f in self.fields if f != "epoch"]
            self.progress = Progress(*columns, console=self.console, transient=False)
            self.task = self.progress.add_task(title, total=total, completed=completed,
                                               **{f: "-" for f in ("speed", *self.fields)})
            self.progress.start()

    def speed(self) -> float:
        return self.clips / max(time.perf_counter() - self.start, 1e-9)

    def update(self, advance: int = 1, clips: int = 0, **fields: Any) -> None:
        self.clips += clips
        if self.progress is not None:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in fields.items()
                     if k in self.fields}
            self.progress.update(self.task, advance=advance, speed=f"{self.speed():.1f}", **shown)

    def sub_bar(self, title: str, total: int) -> SubBar:
        """A second bar below this one (live only; otherwise it shows nothing): an evaluation's batches
        and clips/s. Close it when done (it disappears)."""
        if self.progress is None:
            return SubBar(None, None)
        return SubBar(self.progress, self.progress.add_task(title, total=total, speed="-"))

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(message)
        else:
            self.console.print(message, highlight=False, soft_wrap=True)
        self.record(message)

    def record(self, message: str) -> None:
        """``message`` to ``train.log`` only."""
        if self.log_file is not None:
            self.log_file.write(message)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def table(self, title: str, rows: Mapping[str, Any]) -> None:
        if self.enabled:
            table = summary_table(title, rows)
            self.console.print(table)
            if self.log_file is not None:
                self.log_file.write_renderable(table)


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

"""A run's metrics: ``metrics.jsonl`` (step and epoch rows) and ``metrics.csv`` (the epoch rows).

``metrics.jsonl`` holds one JSON object per line, of two kinds, told apart by ``kind``:

* ``{"kind": "step", "step", "epoch", "train/loss", "lr", "clips_per_s", "grad_norm"}`` every
  ``train.log_every`` optimizer steps: ``epoch`` is fractional (``step / steps per epoch``),
  ``train/loss`` the loss of that step, ``lr`` its learning rate, ``clips_per_s`` the clips per
  second (all ranks) since the previous step row, ``grad_norm`` the total L2 norm of the trainable
  gradients before clipping (NaN for a step whose update was skipped);
* ``{"kind": "epoch", "epoch", "step", "train/loss", "lr", "val/<metric>" ...}`` after every epoch:
  ``epoch`` counts finished epochs, ``train/loss`` averages the epoch's steps.

A row without ``kind`` (written before step rows existed) is an epoch row: read rows through
:func:`read_rows` / :func:`epoch_rows`. ``metrics.csv`` is the table of the epoch rows (columns:
the union of their keys, ``kind`` left out), rewritten after each of them.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fusionkit.engine.checkpoint import RunDirError, atomic_write_bytes
from fusionkit.errors import describe_os_error

JSONL = "metrics.jsonl"
CSV = "metrics.csv"


def row_kind(row: Mapping[str, Any]) -> str:
    """``step`` or ``epoch`` (a row without ``kind`` is an epoch row)."""
    return str(row.get("kind", "epoch"))


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (a run folder or the file); a line cut by a kill is dropped."""
    path = Path(path)
    if path.is_dir():
        path = path / JSONL
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if isinstance(row, dict):
                    rows.append(row)
    return rows


def epoch_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [dict(r) for r in rows if row_kind(r) == "epoch"]


def step_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [dict(r) for r in rows if row_kind(r) == "step"]


class MetricsFile:
    """Appends rows to ``DIR/metrics.jsonl`` (rank 0) and rewrites ``DIR/metrics.csv`` after each epoch row."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.jsonl = self.directory / JSONL

    def append(self, row: Mapping[str, Any]) -> None:
        """Append ``row``; after an epoch row, rewrite the CSV."""
        try:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(dict(row)) + "\n")
            if row_kind(row) == "epoch":
                self.write_csv(read_rows(self.jsonl))
        except OSError as err:
            raise RunDirError(f"cannot write the metrics of {self.directory}: {describe_os_error(err)}") from err

    def write_csv(self, rows: Iterable[Mapping[str, Any]]) -> None:
        epochs = [{k: v for k, v in r.items() if k != "kind"} for r in epoch_rows(rows)]
        columns: list[str] = []
        for r in epochs:
            columns.extend(k for k in r if k not in columns)
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(epochs)
        atomic_write_bytes(self.directory / CSV, buf.getvalue().encode())

    def truncate(self, step: int) -> None:
        """Drop the rows after ``step`` (written by a run killed before the checkpoint that follows them,
        or by an abandoned continuation) and rewrite the CSV."""
        if not self.jsonl.is_file():
            return
        lines = [line for line in self.jsonl.read_text().splitlines() if line.strip()]
        kept = [r for r in read_rows(self.jsonl) if int(r.get("step", 0)) <= step]
        if len(kept) == len(lines):
            return
        atomic_write_bytes(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self.write_csv(kept)

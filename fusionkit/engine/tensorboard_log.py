"""TensorBoard event files of a run (``RUN_DIR/tb/``), when the optional ``tensorboard`` package is there.

``pip install 'fusionkit[tensorboard]'`` adds it; without it :func:`open_writer` returns None, the run
writes everything else as usual, and one debug line (``logging``, logger ``fusionkit.engine``) says
why, once per process. The scalars are those of ``metrics.jsonl``, at the optimizer step: step rows
as ``step/<key>`` (``step/train/loss``, ``step/lr``, ``step/clips_per_s``, ``step/grad_norm``), epoch
rows as ``epoch/<key>`` (``epoch/train/loss``, ``epoch/lr``) and ``val/<metric>``. A resumed run
purges the events after its checkpoint's step (as ``metrics.jsonl`` drops those rows).

    tensorboard --logdir runs/                 # every run below runs/, one curve each
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fusionkit.engine.metrics_file import row_kind

LOG = logging.getLogger("fusionkit.engine")
TB_DIR = "tb"
_WRITER_CLASS: list[Any] = []  # [SummaryWriter or None], filled by the first import attempt


def summary_writer_class() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or None when it cannot be imported (no ``tensorboard``)."""
    if not _WRITER_CLASS:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as err:  # noqa: BLE001 - ImportError, or a broken tensorboard install
            LOG.debug("no TensorBoard event files: torch.utils.tensorboard does not import (%s); "
                      "pip install 'fusionkit[tensorboard]'", err)
            SummaryWriter = None  # noqa: N806
        _WRITER_CLASS.append(SummaryWriter)
    return _WRITER_CLASS[0]


class TensorBoardLog:
    """Writes the rows of ``metrics.jsonl`` as scalars to ``directory/tb``."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def add_row(self, row: Mapping[str, Any]) -> None:
        kind, step = row_kind(row), int(row.get("step", 0))
        for key, value in row.items():
            if key in ("kind", "step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            tag = key if key.startswith("val/") else f"{kind}/{key}"
            self.writer.add_scalar(tag, float(value), step)

    def close(self) -> None:
        self.writer.close()


def open_writer(run_dir: str | Path, purge_step: int | None = None) -> TensorBoardLog | None:
    """A :class:`TensorBoardLog` for ``run_dir/tb`` (events from ``purge_step`` on hidden: a resumed
    run's later steps), or None without TensorBoard."""
    cls = summary_writer_class()
    if cls is None:
        return None
    return TensorBoardLog(cls(log_dir=str(Path(run_dir) / TB_DIR), purge_step=purge_step))

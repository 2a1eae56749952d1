"""Silencing a library's logger for the length of one call (imports nothing of fusionkit)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet(name: str | None = None, level: int = logging.ERROR) -> Iterator[None]:
    """Raise logger ``name`` (``None``: the root logger) to ``level`` inside the block, then restore it."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


__all__ = ["quiet"]

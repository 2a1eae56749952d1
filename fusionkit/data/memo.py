"""A process-wide memory of decoded media: each (file, frames) or (file, audio window) decoded once.

A dataset with ``decoded_cache_gb > 0`` asks :func:`decoded` instead of decoding again: the first
epoch decodes the real files with PyAV, later epochs (and other datasets of the same process, e.g.
the variants of an ablation, loading with ``num_workers: 0``) reuse the decoded arrays; the
random augmentation still runs on every draw. Keys name the file by path, size and modification
time, so a rewritten file is decoded anew. Entries beyond the budget are not stored (the oldest
ones stay). DataLoader worker processes each hold their own memory, lost when they exit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")
_STORE: dict[Hashable, Any] = {}
_USED = [0]


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, tuple):
        return sum(_nbytes(v) for v in value)
    return 256


def file_key(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """``(path, size, mtime_ns)`` of a file."""
    st = os.stat(path)
    return str(path), st.st_size, st.st_mtime_ns


def decoded(key: Hashable, compute: Callable[[], T], max_gb: float) -> T:
    """``compute()``, remembered under ``key`` while the store holds less than ``max_gb`` GB."""
    if max_gb <= 0:
        return compute()
    if key in _STORE:
        return _STORE[key]
    value = compute()
    size = _nbytes(value)
    if _USED[0] + size <= max_gb * 1e9:
        _STORE[key] = value
        _USED[0] += size
    return value


def clear() -> None:
    """Forget everything (tests)."""
    _STORE.clear()
    _USED[0] = 0

"""Decoded media remembered: each (file, frames) or (file, audio window) decoded once.

A dataset with ``decoded_cache_gb > 0`` asks :func:`decoded` instead of decoding again: the first
epoch decodes the real files with PyAV, later epochs (and other datasets of the same process, e.g.
the variants of an ablation, loading with ``num_workers: 0``) reuse the decoded arrays; the
random augmentation still runs on every draw. Keys name the file by path, size and modification
time, so a rewritten file is decoded anew. Entries beyond the budget are not stored in memory
(the oldest ones stay). DataLoader worker processes each hold their own memory, lost when they exit.

With a ``directory`` (``decoded_cache_dir``) every entry is also written there, one file per key
(``<2 hex>/<sha1 of the key>.pkl``, written to a temporary name and renamed, so concurrent
processes never read half a file), and any process asks the folder before decoding: the workers
of ``fusionkit ablate --jobs N``, DataLoader workers and later calls share one decoding of each
clip. An entry that cannot be read back (truncated, foreign) is decoded again and rewritten, with a
warning naming it; a folder that cannot be written (disk full, read-only) turns the disk layer off
for the process with one warning, and nothing else changes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

log = logging.getLogger(__name__)

T = TypeVar("T")
_STORE: dict[Hashable, Any] = {}
_USED = [0]
_UNWRITABLE: set[str] = set()  # folders this process could not write (warned once each)
_MISSING = object()


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


def entry_path(directory: str | os.PathLike[str], key: Hashable) -> Path:
    """The file of ``key`` in a decoded-media folder (keys are tuples of str / int / float / None)."""
    digest = hashlib.sha1(repr(key).encode()).hexdigest()
    return Path(directory) / digest[:2] / f"{digest}.pkl"


def _read(path: Path, key: Hashable) -> Any:
    try:
        with path.open("rb") as fh:
            stored_key, value = pickle.load(fh)
    except FileNotFoundError:
        return _MISSING
    except Exception as err:  # noqa: BLE001 - any unreadable entry is decoded again
        log.warning("decoded-media cache: %s is unreadable (%s: %s); decoding again", path, type(err).__name__, err)
        return _MISSING
    return value if stored_key == key else _MISSING  # a sha1 collision, in theory


def _write(path: Path, key: Hashable, value: Any) -> None:
    folder = str(path.parent.parent)
    if folder in _UNWRITABLE:
        return
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            pickle.dump((key, value), fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except OSError as err:
        _UNWRITABLE.add(folder)
        log.warning("decoded-media cache: cannot write to %s (%s); decoding without it in this process", folder, err)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def decoded(key: Hashable, compute: Callable[[], T], max_gb: float,
            directory: str | os.PathLike[str] | None = None) -> T:
    """``compute()``, remembered under ``key`` in memory (while the store holds less than ``max_gb``
    GB) and in ``directory`` when one is given."""
    if max_gb <= 0 and directory is None:
        return compute()
    if key in _STORE:
        return _STORE[key]
    value = _MISSING
    if directory is not None:
        path = entry_path(directory, key)
        value = _read(path, key)
    if value is _MISSING:
        value = compute()
        if directory is not None:
            _write(path, key, value)
    size = _nbytes(value)
    if max_gb > 0 and _USED[0] + size <= max_gb * 1e9:
        _STORE[key] = value
        _USED[0] += size
    return value


def clear() -> None:
    """Forget what this process holds in memory (tests); folders are left as they are."""
    _STORE.clear()
    _USED[0] = 0
    _UNWRITABLE.clear()

"""Batching: :func:`collate` stacks dataset items and reports the ones that failed to decode.

A dataset returns :class:`Skipped` (the path and the reason) for a file it cannot decode; collate
drops it from the batch and lists ``(path, reason)`` under ``batch["skipped"]`` so the training
loop can count and name bad files in its epoch summary. A batch whose every item failed is still a
valid dict: ``batch_size`` 0, the ``skipped`` list, empty ``clip_id`` / ``path`` lists, no tensors.

Batches declare their modalities: items that carry ``modalities`` (the names of their stream tensors,
e.g. ``("video", "flow")``; :class:`~fusionkit.data.dataset.ManifestDataset` sets it) give the batch a
``modalities`` list, which is what the engine moves to the device, mixes (mixup) and feeds the model;
other float tensors of a batch (``span``) are metadata.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Skipped:
    """Placeholder for an item whose media could not be decoded."""

    path: str
    reason: str
    clip_id: str = ""

    def __bool__(self) -> bool:  # `if item:` treats it like the None it replaces
        return False


def _pad_stack(values: list[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Stack; 1-D tensors of different lengths are zero-padded at the end (lengths returned)."""
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) == 1:
        return torch.stack(values), None
    if all(v.dim() == 1 for v in values):
        lengths = torch.tensor([v.shape[0] for v in values], dtype=torch.long)
        out = values[0].new_zeros(len(values), int(lengths.max()))
        for i, v in enumerate(values):
            out[i, : v.shape[0]] = v
        return out, lengths
    if all(v.dim() >= 1 for v in values) and len({tuple(v.shape[1:]) for v in values}) == 1:  # (frames, F) features
        lengths = torch.tensor([v.shape[0] for v in values], dtype=torch.long)
        out = values[0].new_zeros(len(values), int(lengths.max()), *values[0].shape[1:])
        for i, v in enumerate(values):
            out[i, : v.shape[0]] = v
        return out, lengths
    raise ValueError(f"collate: cannot batch tensors of shapes {sorted(shapes)}")


def _merge(key: str, values: list[Any], out: dict[str, Any]) -> None:
    first = values[0]
    if isinstance(first, Tensor):
        out[key], lengths = _pad_stack(values)
        if lengths is not None:
            out[f"{key}_lengths"] = lengths
    elif isinstance(first, Mapping):
        sub: dict[str, Any] = {}
        for k in first:
            _merge(k, [v[k] for v in values], sub)
        out[key] = sub
    elif isinstance(first, bool):
        out[key] = torch.tensor(values, dtype=torch.bool)
    elif isinstance(first, (int, float)) and not isinstance(first, bool):
        out[key] = torch.tensor(values)
    else:
        out[key] = list(values)


def collate(items: Sequence[Mapping[str, Any] | Skipped | None]) -> dict[str, Any]:
    """Batch dataset items: tensors stacked (variable-length 1-D audio zero-padded, with
    ``<key>_lengths``), ``labels`` per head ``(B,)``, ``clip_id`` / ``path`` lists, ``audio_missing``
    bool ``(B,)``, ``batch_size``; failed items dropped and listed in ``skipped`` as ``(path, reason)``."""
    good = [x for x in items if isinstance(x, Mapping)]
    skipped = []
    for x in items:
        if isinstance(x, Skipped):
            skipped.append((x.path, x.reason))
        elif x is None:
            skipped.append(("<unknown>", "the dataset returned None"))
    out: dict[str, Any] = {"batch_size": len(good), "skipped": skipped, "clip_id": [], "path": []}
    if not good:
        return out
    keys = list(good[0])
    for x in good[1:]:
        if list(x) != keys:
            raise ValueError(f"collate: items have different keys: {keys} vs {list(x)}")
    if MODALITIES_KEY in keys:
        keys.remove(MODALITIES_KEY)
        out[MODALITIES_KEY] = declared_modalities(good)
    for key in keys:
        _merge(key, [x[key] for x in good], out)
    return out


MODALITIES_KEY = "modalities"


def declared_modalities(items: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ``modalities`` the items declare (one list for all, in the items' order); a ``ValueError``
    when two items declare different ones or one names a key it does not carry as a tensor."""
    names = list(items[0][MODALITIES_KEY])
    for x in items:
        if list(x[MODALITIES_KEY]) != names:
            raise ValueError(f"collate: items declare different modalities: {names} vs {list(x[MODALITIES_KEY])}")
        missing = [m for m in names if not isinstance(x.get(m), Tensor)]
        if missing:
            raise ValueError(f"collate: an item declares the modality {missing[0]!r} but has no tensor of that name")
    return names

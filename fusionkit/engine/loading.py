"""Datasets and loaders of the ``data`` section, and moving batches to a device.

Datasets come from ``fusionkit.registry.DATASETS`` (``manifest`` from :mod:`fusionkit.data`,
``synthetic`` for tests). Items are dicts (``video`` ``(3, T, H, W)``, ``audio`` ``(samples,)``,
``labels`` ``{head: int64}``, ``clip_id``, ``path``); a collate stacks them and lists the items it
could not decode in ``skipped``. The collate is the dataset's own ``collate`` attribute if it has
one, else :func:`fusionkit.data.collate.collate` (one for every built-in dataset).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fusionkit.data.collate import collate
from fusionkit.data.loader import build_loader
from fusionkit.engine.config import check_dataset_spec
from fusionkit.recipes import RecipeError
from fusionkit.registry import closest


def build_dataset(spec: Mapping[str, Any], path: str = "data") -> Dataset:
    """The registered dataset of ``spec`` (``{type: ..., **options}``)."""
    cls = check_dataset_spec(path, spec)
    options = {k: v for k, v in spec.items() if k != "type"}
    try:
        return cls(**options)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as err:
        raise RecipeError(f"{path}: {err}") from err


def label_classes(dataset: Dataset) -> dict[str, int | None] | None:
    """The labels a dataset gives, with their number of classes where known (``None`` if it does not say).

    From the dataset's own ``label_classes()``, else its ``manifest`` (label → class names), else a
    ``classes`` mapping (label → count, the synthetic dataset)."""
    own = getattr(dataset, "label_classes", None)
    if callable(own):
        return dict(own())
    manifest = getattr(dataset, "manifest", None)
    if manifest is not None and isinstance(getattr(manifest, "heads", None), Mapping):
        return {h: None for h in manifest.heads}  # ids are checked row by row (Manifest.check_ids)
    classes = getattr(dataset, "classes", None)
    if isinstance(classes, Mapping):
        return {str(h): int(c) for h, c in classes.items()}
    return None


def check_labels(dataset: Dataset, heads: Mapping[str, Any], where: str = "data.train") -> None:
    """Before the first step: each head's target label is one the dataset gives, and the dataset's class
    ids fit the head (a manifest names its first row outside the head's classes)."""
    labels = label_classes(dataset)
    if labels is None:
        return
    manifest = getattr(dataset, "manifest", None)
    for name, head in heads.items():
        target = getattr(head, "target", None) or name
        if target not in labels:
            hint = ", ".join(closest(target, list(labels))) or "(none)"
            raise RecipeError(f"heads.{name} trains on the label {target!r}, but {where} has no such label "
                              f"(its labels: {', '.join(sorted(labels)) or 'none'}; closest: {hint}); set "
                              f"heads.{name}.target, or the dataset's heads / label columns")
        n = getattr(head, "num_classes", None)
        if n is None or getattr(head, "multilabel", False):
            continue
        if labels[target] is not None and labels[target] > int(n):
            raise RecipeError(f"{where} has {labels[target]} classes of {target!r} but heads.{name} has {n}")
        if manifest is not None and hasattr(manifest, "check_ids"):
            manifest.check_ids(target, int(n), f"heads.{name} ({where})")


def collate_for(dataset: Dataset) -> Callable[[list[Any]], dict[str, Any]]:
    """The dataset's own ``collate`` if it has one, else :func:`fusionkit.data.collate.collate`."""
    own = getattr(dataset, "collate", None)
    return own if callable(own) else collate


def make_loader(dataset: Dataset, batch_size: int, sampler: Any, num_workers: int = 0, seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A loader over ``sampler``'s indices (order and sharding are the sampler's, for exact resume), with
    :func:`collate_for` the dataset, seeded workers and generator (:func:`fusionkit.data.loader.build_loader`)."""
    return build_loader(dataset, batch_size=batch_size, num_workers=num_workers, seed=seed, sampler=sampler,
                        drop_last=drop_last, collate_fn=collate_for(dataset), persistent_workers=False,
                        pin_memory=torch.cuda.is_available())


def batch_targets(batch: Mapping[str, Any]) -> dict[str, Tensor]:
    """``{head: (B,) int64}`` from a collated batch (``labels`` as a dict of tensors or a list of dicts)."""
    labels = batch.get("labels", {})
    if isinstance(labels, Mapping):
        return {h: torch.as_tensor(v) for h, v in labels.items()}
    if not labels:
        return {}
    return {h: torch.stack([torch.as_tensor(item[h]) for item in labels]) for h in labels[0]}


def modality_tensors(batch: Mapping[str, Any]) -> dict[str, Tensor]:
    """The stream tensors of a collated batch: those its ``modalities`` declare (fusionkit.data.collate),
    else (a dataset that does not declare them) every floating-point tensor."""
    declared = batch.get("modalities")
    if declared is not None:
        return {k: batch[k] for k in declared if isinstance(batch.get(k), Tensor)}
    return {k: v for k, v in batch.items() if isinstance(v, Tensor) and v.is_floating_point()}


def batch_size_of(batch: Mapping[str, Any]) -> int:
    """Clips in a collated batch: the first dimension of its modality tensors, else its clip ids."""
    for value in modality_tensors(batch).values():
        if value.dim() >= 1:
            return int(value.shape[0])
    return len(batch.get("clip_id") or [])


def to_device(batch: Mapping[str, Any], device: torch.device) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(modality tensors, targets) of a batch on ``device``."""
    inputs = {k: v.to(device, non_blocking=True) for k, v in modality_tensors(batch).items()}
    targets = {h: t.to(device, non_blocking=True) for h, t in batch_targets(batch).items()}
    return inputs, targets


def check_modalities(dataset: Dataset, model: Any, where: str = "data.train") -> None:
    """Before the first batch: every modality the model's experts read has a data producer
    (``fusionkit.registry.MODALITIES``) and is one the dataset gives, when it says (``modalities``);
    else a :class:`~fusionkit.recipes.RecipeError` naming the expert, the modality and the fix."""
    from fusionkit.registry import MODALITIES

    gives = getattr(dataset, "modalities", None)
    for name, expert in getattr(model, "experts", {}).items():
        modality = expert.modality
        if modality not in MODALITIES:
            raise RecipeError(f"experts.{name} reads the modality {modality!r}, which no data producer gives "
                              f"(registered modalities: {', '.join(MODALITIES.names())}); a plugin registers one "
                              "with fusionkit.registry.MODALITIES (docs/plugins.md)")
        if gives is not None and modality not in gives:
            kind = type(dataset).__name__
            fix = f"add it to {where}.modalities" if "modalities" in accepted(type(dataset)) \
                else "use a dataset that produces it (e.g. type: manifest with modalities)"
            raise RecipeError(f"experts.{name} reads the modality {modality!r} but {where} ({kind}) gives only "
                              f"{', '.join(gives)}: {fix}")


def accepted(cls: type) -> list[str]:
    """The keyword arguments a dataset class takes."""
    from fusionkit.recipes import accepted_keys

    try:
        return accepted_keys(cls)[0]
    except (TypeError, ValueError):
        return []

"""Model inputs for one media file with a recipe's test-time data options (``fusionkit predict``).

:func:`load_inputs` decodes every test view (``clips × crops``) of one file exactly as the recipe's
evaluation dataset would: the ``data.test`` spec (else ``data.val``, else ``data.train``) of type
``manifest``, in evaluation mode, reading the modalities the caller names (``fusionkit predict``: those
the recipe's experts read, built-in or from a plugin). Without a data section the shapes come from the recipe's
``inputs`` (``video: [3, T, H, W]`` gives ``frames=T``, ``size=H``; ``audio: [samples]`` gives
``seconds = samples / 16000``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from fusionkit.data.collate import Skipped, collate
from fusionkit.data.decode import DecodeError
from fusionkit.data.dataset import ManifestDataset
from fusionkit.registry import MODALITIES

MANIFEST_ONLY = ("type", "path", "root", "heads", "classes", "train", "seed")


def _plain(obj: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return obj


def test_options(recipe: Mapping[str, Any], modalities: Sequence[str] | None = None) -> dict[str, Any]:
    """``ManifestDataset`` keyword arguments (no manifest, evaluation mode) from a recipe; ``modalities``
    (what the model's experts read) replaces the spec's own list when given."""
    recipe = _plain(recipe) or {}
    data = recipe.get("data") or {}
    wanted = {"modalities": list(dict.fromkeys(modalities))} if modalities else {}
    for split in ("test", "val", "train"):
        spec = data.get(split)
        if isinstance(spec, Mapping) and spec.get("type", "manifest") == "manifest":
            return {**{k: v for k, v in spec.items() if k not in MANIFEST_ONLY}, **wanted}
    inputs = recipe.get("inputs") or {}
    opts: dict[str, Any] = {"modalities": [m for m in inputs if m in MODALITIES] or ["video"], **wanted}
    if "video" in inputs and len(inputs["video"]) == 4:
        opts["frames"], opts["size"] = int(inputs["video"][1]), int(inputs["video"][2])
    if "audio" in inputs and len(inputs["audio"]) == 1:
        opts["audio"] = {"seconds": int(inputs["audio"][0]) / 16000}
    return opts


test_options.__test__ = False  # not a pytest test


def load_inputs(path: str | Path, recipe: Mapping[str, Any], modalities: Sequence[str] | None = None) -> dict[str, Tensor]:
    """``{modality: (V, ...)}`` for the ``V`` test views of ``path`` (``modalities``: those the model reads,
    default the recipe's data spec's); :class:`DecodeError` if it cannot be decoded."""
    path = Path(path).resolve()
    options = test_options(recipe, modalities)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "one.jsonl"
        manifest.write_text(json.dumps({"path": str(path)}) + "\n")
        ds = ManifestDataset(path=manifest, heads={}, train=False, **options)
        items = [ds[i] for i in range(len(ds))]
    bad = [x for x in items if isinstance(x, Skipped)]
    if bad:
        raise DecodeError(bad[0].reason)
    batch = collate(items)
    return {k: batch[k] for k in ds.modalities if k in batch}

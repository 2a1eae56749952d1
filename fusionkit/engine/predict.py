"""``fusionkit predict RECIPE --video FILE [--checkpoint C] [--json]``: top-k classes per head for one clip.

The clip is decoded by the data package (``fusionkit.data.load_inputs(path, recipe)``, the recipe's
sampling and test transform, every modality of the recipe's ``inputs``: video, audio, MM-ViT's
iframe / motion / residual streams) or read from a pre-decoded tensor file: ``.safetensors`` (or
``.pt``, loaded with ``weights_only=True``) holding those tensors by name, e.g. ``video``
``(3, T, H, W)`` and ``audio`` ``(samples,)`` (a leading batch dimension of views is accepted; their
probabilities are averaged).

A folder, a manifest or ``--out FILE`` (CSV / JSON Lines) predicts many clips, batched:
:mod:`fusionkit.engine.predict_batch`, built on :func:`head_probs` and :func:`top_classes` here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fusionkit.data import load_inputs as decode_media
from fusionkit.data.decode import DecodeError
from fusionkit.errors import UsageError

def modalities(recipe: Mapping[str, Any]) -> dict[str, int]:
    """What the recipe's model reads: modality → dimensions of one sample (its ``inputs`` entry), for
    the modalities its experts read (:func:`fusionkit.recipes.expert_modalities`: built-in or a plugin's)."""
    from fusionkit.recipes import expert_modalities

    read = set(expert_modalities(recipe).values())
    return {k: len(v) for k, v in (recipe.get("inputs") or {}).items() if v is not None and (k in read or not read)}


def load_inputs(path: str | Path, recipe: Mapping[str, Any]) -> dict[str, Tensor]:
    """Model inputs ``{modality: (V, ...)}`` (``V`` views) for one clip file: every modality of the
    recipe's ``inputs`` (video, audio, MM-ViT's iframe / motion / residual, ...)."""
    path = Path(path)
    if path.is_dir():
        raise DecodeError(f"--video: {path} is a directory, not a media file")
    if not path.is_file():
        raise DecodeError(f"--video: no such file {path}" if not path.exists() else f"--video: {path} is not a file")
    if path.suffix in (".safetensors", ".pt", ".pth"):
        raw = _tensor_file(path)
        if not isinstance(raw, Mapping):
            raise DecodeError(f"{path}: expected a dict of tensors named by the recipe's inputs "
                              f"({', '.join(modalities(recipe))})")
    else:
        raw = decode_media(path, recipe, list(modalities(recipe)))  # PyAV, the recipe's test-time views
    wanted, inputs = modalities(recipe), {}
    for key, ndim in wanted.items():
        if key in raw:
            x = torch.as_tensor(raw[key]).float()
            inputs[key] = x.unsqueeze(0) if x.dim() == ndim else x
    if not inputs:
        raise DecodeError(f"{path}: none of the recipe's inputs ({', '.join(wanted)}) in it (found {sorted(raw)})")
    return inputs


def _tensor_file(path: Path) -> Any:
    """The tensors of a pre-decoded clip (``.safetensors``, or a torch file read with ``weights_only``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise DecodeError(f"--video: cannot read {path} as a {path.suffix} tensor file: {err}") from err


def check_count(value: Any, what: str = "--topk", unit: str = "classes") -> int:
    """``value`` as a positive int, else a :class:`~fusionkit.errors.UsageError` naming ``what`` and ``unit``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{what} must be a positive number of {unit}, got {value!r}")
    return value


@torch.no_grad()
def head_probs(model: torch.nn.Module, inputs: Mapping[str, Tensor], views: int) -> dict[str, Tensor]:
    """Class probabilities ``{head: (N, C)}`` of ``N`` clips from ``inputs`` ``{modality: (N·views, ...)}``
    (the views of a clip consecutive): softmax (sigmoid for a multi-label head) averaged over each clip's views."""
    device = next(model.parameters()).device
    model.eval()
    logits = model({k: v.to(device) for k, v in inputs.items()})
    out = {}
    for head, x in logits.items():
        multilabel = getattr(model.heads[head], "multilabel", False)
        probs = torch.sigmoid(x.float()) if multilabel else torch.softmax(x.float(), dim=-1)
        out[head] = probs.reshape(-1, views, probs.shape[-1]).mean(1).cpu()
    return out


def top_classes(probs: Tensor, topk: int, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The ``topk`` most probable classes of ``probs`` ``(C,)``: ``[{"rank", "class", "name", "prob"}, ...]``
    (``name`` is the class index as text without ``names``)."""
    values, indices = probs.topk(min(int(topk), probs.numel()))
    return [{"rank": r + 1, "class": int(i), "name": names[int(i)] if names else str(int(i)), "prob": float(v)}
            for r, (v, i) in enumerate(zip(values, indices))]


def predict(model: torch.nn.Module, inputs: Mapping[str, Tensor], topk: int = 5,
            class_names: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Top-``topk`` classes per head of one clip, views averaged: ``{head: [{"rank", "class", "name", "prob"}]}``."""
    probs = head_probs(model, inputs, views=len(next(iter(inputs.values()))))
    return {head: top_classes(p[0], topk, (class_names or {}).get(head)) for head, p in probs.items()}


def render(predictions: Mapping[str, list[Mapping[str, Any]]], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, justify in (("head", "left"), ("rank", "right"), ("class", "right"), ("name", "left"), ("prob", "right")):
        table.add_column(col, justify=justify)
    for head, rows in predictions.items():
        for r in rows:
            table.add_row(head if r["rank"] == 1 else "", str(r["rank"]), str(r["class"]), r["name"], f"{r['prob']:.4f}")
        table.add_section()
    return table


def class_names_of(cfg: Mapping[str, Any], model: torch.nn.Module) -> dict[str, list[str]]:
    """Class names per head from the recipe's manifest (test, else val, else train), following each
    head's ``target`` label; a head without a fitting list (no readable manifest, or class names
    inferred from labels that do not cover the head's classes) shows class indices."""
    from fusionkit.data.manifest import Manifest, ManifestError

    data = cfg.get("data") or {}
    spec = next((data[s] for s in ("test", "val", "train")
                 if isinstance(data.get(s), Mapping) and data[s].get("type") == "manifest"), None)
    if spec is None:
        return {}
    try:
        names = Manifest(spec["path"], root=spec.get("root"), heads=spec.get("heads"), classes=spec.get("classes")).names
    except (OSError, ManifestError):
        return {}
    labels = {h: getattr(head, "target", None) or h for h, head in model.heads.items()}
    return {h: names[label] for h, label in labels.items()  # a list that does not fit the head is not used
            if label in names and len(names[label]) == model.heads[h].num_classes}


def prepare(recipe: Any, overrides: Sequence[str] = (), topk: int | None = None,
            device: str = "auto") -> tuple[Any, dict[str, Any], int, torch.device]:
    """The loaded recipe, its ``eval`` section, the number of classes to list and the device to run on."""
    from fusionkit.engine.config import eval_config, train_config
    from fusionkit.engine.device import pick_device
    from fusionkit.recipes import load_recipe

    cfg = load_recipe(recipe, list(overrides))
    tcfg, ecfg = train_config(cfg), eval_config(cfg)
    k = check_count(topk) if topk is not None else check_count(ecfg["topk"], "recipe key 'eval.topk'")
    return cfg, ecfg, k, pick_device(device if device != "auto" else tcfg["device"])


def run_predict(recipe: Any, video: str | Path, checkpoint: str | None = None, overrides: Sequence[str] = (),
                topk: int | None = None, device: str = "auto") -> dict[str, Any]:
    """Load the recipe (and checkpoint), read the clip, return ``{"file", "checkpoint", "predictions"}``."""
    from fusionkit.engine.evaluate import model_for

    cfg, _, k, dev = prepare(recipe, overrides, topk, device)
    inputs = load_inputs(video, cfg)
    model, _ = model_for(cfg, checkpoint, dev)
    preds = predict(model, inputs, k, class_names_of(cfg, model))
    return {"file": str(video), "checkpoint": str(checkpoint) if checkpoint else None, "predictions": preds}

"""``fusionkit predict RECIPE --video FOLDER | --manifest FILE [--out FILE]``: top-k classes per head for many clips.

The clips are every file directly in ``FOLDER`` (sorted by name, hidden files left out) or every row
of a manifest (the format the ``manifest`` datasets read, :mod:`fusionkit.data.manifest`: ``path``,
optional ``start`` / ``end`` / ``id`` / ``audio_path``, label columns). They are decoded by
:class:`~fusionkit.data.dataset.ManifestDataset` with the recipe's test-time options
(:func:`fusionkit.data.load_inputs.test_options`, as for one ``--video FILE``), ``batch_size`` clips
(all their views) per forward pass; clips whose inputs differ in shape go through separate passes,
so every clip gets the probabilities it gets alone. A clip that cannot be decoded is skipped and
named in :meth:`BatchResult.warning`; when every clip fails, :class:`~fusionkit.errors.DataError`.

Rows (one per clip, in folder / manifest order): ``{"path", "id", "labels", "predictions"}``:
``id`` is the manifest's ``id`` (else the row number), ``labels`` ``{column: value}`` the manifest's
labels (absent without label columns; an empty label is ``None``), ``predictions`` ``{head: [{"rank",
"class", "name", "prob"}, ...]}`` as for one clip. :func:`write_rows` writes them atomically as JSON
Lines (``.jsonl``, one row per line) or CSV (``.csv``: columns ``path``, ``id``, ``label/<column>``,
``<head>/top<rank>/class``, ``.../name``, ``.../prob``).

An ``--out`` with another suffix, or one that exists without ``overwrite``, an empty folder and a
missing manifest are :class:`~fusionkit.errors.FusionkitError` s raised before anything is decoded.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fusionkit.engine.predict import check_count, class_names_of, head_probs, modalities, prepare, top_classes
from fusionkit.errors import DataError, UsageError, one_line
from fusionkit.logs import quiet

OUT_SUFFIXES = (".csv", ".jsonl")


@dataclass
class BatchResult:
    """The rows of a batch prediction, the ``(path, reason)`` of the clips skipped, of ``total`` clips."""

    rows: list[dict[str, Any]]
    skipped: list[tuple[str, str]]
    total: int
    root: Path  # skipped paths are named relative to it
    out: Path | None = None

    def warning(self) -> str | None:
        """``skipped 1 of 5 files: x.mp4 (reason)``, or None when nothing was skipped."""
        if not self.skipped:
            return None
        named = ", ".join(f"{_relative(p, self.root)} ({one_line(r)})" for p, r in self.skipped)
        return f"skipped {len(self.skipped)} of {self.total} files: {named}"


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def is_batch(video: str | Path | None, manifest: str | Path | None, out: str | Path | None) -> bool:
    """Whether ``predict`` runs on many clips: a manifest, a folder, or any input written to ``--out``."""
    return manifest is not None or out is not None or Path(video).is_dir()


def check_out(out: str | Path | None, overwrite: bool = False) -> Path | None:
    """``out`` as a path to write: a known suffix, not another run's file unless ``overwrite``."""
    if out is None:
        return None
    out = Path(out)
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise UsageError(f"--out {out}: unknown format {out.suffix or '(no suffix)'!r}; use .csv or .jsonl")
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out} already exists; pass --overwrite to replace it")
    return out


def folder_files(folder: Path) -> list[str]:
    """The names of the files directly in ``folder`` (sorted, hidden ones left out); none is an error."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not names:
        raise UsageError(f"--video: {folder} is a directory without files to predict")
    return names


def clip_dataset(options: Mapping[str, Any], video: str | Path | None = None,
                 manifest: str | Path | None = None) -> Any:
    """The evaluation-mode :class:`~fusionkit.data.dataset.ManifestDataset` of a manifest, a folder or one file."""
    from fusionkit.data.dataset import ManifestDataset

    if manifest is not None:
        return ManifestDataset(path=manifest, train=False, **options)
    if video is None:
        raise UsageError("predict: give a media file or folder (--video) or a manifest (--manifest)")
    path = Path(video)
    if not path.exists():
        raise UsageError(f"--video: no such file or folder {path}")
    root, names = (path, folder_files(path)) if path.is_dir() else (path.parent, [path.name])
    with tempfile.TemporaryDirectory() as tmp:  # the dataset reads its listing when built
        listing = Path(tmp) / "files.jsonl"
        listing.write_text("".join(json.dumps({"path": name}) + "\n" for name in names))
        return ManifestDataset(path=listing, root=root, heads={}, train=False, **options)


def clip_probs(model: torch.nn.Module, clips: Sequence[Mapping[str, Tensor]], views: int) -> list[dict[str, Tensor]]:
    """``{head: (C,)}`` per clip (inputs ``{modality: (views, ...)}``); clips of equal input shapes share
    one forward pass, so no clip is padded to another's shape."""
    groups: dict[tuple, list[int]] = {}
    for i, clip in enumerate(clips):
        groups.setdefault(tuple((k, tuple(v.shape)) for k, v in clip.items()), []).append(i)
    out: list[dict[str, Tensor]] = [{} for _ in clips]
    for members in groups.values():
        probs = head_probs(model, {k: torch.cat([clips[i][k] for i in members]) for k in clips[members[0]]}, views)
        for j, i in enumerate(members):
            out[i] = {head: p[j] for head, p in probs.items()}
    return out


def _split(items: Sequence[Any], views: int) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The collated views of each decodable clip of a loader batch, and the ``(path, reason)`` of the others
    (a clip with one undecodable view is skipped, as it is alone)."""
    from fusionkit.data.collate import Skipped, collate

    good, skipped = [], []
    for i in range(0, len(items), views):
        clip = items[i:i + views]
        bad = next((x for x in clip if isinstance(x, Skipped)), None)
        if bad is None:
            good.append(collate(clip))
        else:
            skipped.append((bad.path, bad.reason))
    return good, skipped


def _row(batch: Mapping[str, Any], probs: Mapping[str, Tensor], topk: int, names: Mapping[str, Sequence[str]],
         label_names: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    row: dict[str, Any] = {"path": batch["path"][0], "id": batch["clip_id"][0]}
    if batch["labels"]:
        row["labels"] = {col: label_names[col][int(v[0])] if int(v[0]) >= 0 else None
                         for col, v in batch["labels"].items()}
    row["predictions"] = {head: top_classes(p, topk, names.get(head)) for head, p in probs.items()}
    return row


def _quiet_skips() -> contextlib.AbstractContextManager[None]:
    """The dataset logs every view it cannot decode; a batch names its skipped clips once, at the end."""
    from fusionkit.data.dataset import ManifestDataset

    return quiet(ManifestDataset.__module__)


def predict_clips(model: torch.nn.Module, dataset: Any, batch_size: int, topk: int,
                  names: Mapping[str, Sequence[str]], num_workers: int = 0,
                  on_batch: Callable[[int], None] | None = None) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The rows of every decodable clip of ``dataset`` and the ``(path, reason)`` of the others."""
    from fusionkit.data.loader import build_loader

    views = dataset.views_per_item
    loader = build_loader(dataset, batch_size * views, num_workers=num_workers, collate_fn=list)
    rows, skipped = [], []
    with _quiet_skips():
        for items in loader:
            good, bad = _split(items, views)
            skipped += bad
            probs = clip_probs(model, [{k: c[k] for k in model.input_shapes if k in c} for c in good], views)
            rows += [_row(c, p, topk, names, dataset.manifest.names) for c, p in zip(good, probs)]
            if on_batch is not None:
                on_batch(len(items) // views)
    return rows, skipped


def run_predict_batch(recipe: Any, video: str | Path | None = None, manifest: str | Path | None = None,
                      out: str | Path | None = None, checkpoint: str | None = None, overrides: Sequence[str] = (),
                      topk: int | None = None, batch_size: int | None = None, overwrite: bool = False,
                      device: str = "auto", progress: bool | None = None, console: Any = None) -> BatchResult:
    """Predict every clip of a folder / manifest / file (``batch_size`` clips at a time, default
    ``eval.batch_size``), with a progress bar; write the rows to ``out`` (when given) and return them."""
    from fusionkit.data.load_inputs import test_options
    from fusionkit.engine.evaluate import model_for
    from fusionkit.engine.progress import Reporter

    target = check_out(out, overwrite)
    cfg, ecfg, k, dev = prepare(recipe, overrides, topk, device)
    size = check_count(ecfg["batch_size"] if batch_size is None else batch_size, "--batch-size", "clips")
    dataset = clip_dataset(test_options(cfg, list(modalities(cfg))), video, manifest)
    model, _ = model_for(cfg, checkpoint, dev)
    reporter = Reporter(math.ceil(len(dataset.manifest) / size), f"predict {cfg.get('name') or ''}".strip(),
                        live=progress, console=console, fields=())
    try:
        rows, skipped = predict_clips(model, dataset, size, k, class_names_of(cfg, model), int(ecfg["num_workers"]),
                                      on_batch=lambda n: reporter.update(1, clips=n))
    finally:
        reporter.close()
    if not rows:
        path, reason = skipped[0]
        raise DataError(f"every one of the {len(skipped)} files failed to decode, e.g. {path}: {one_line(reason)}")
    if target is not None:
        write_rows(target, rows)
    return BatchResult(rows, skipped, len(dataset.manifest), dataset.manifest.root, target)


def flat_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row as CSV columns: ``path``, ``id``, ``label/<column>``, ``<head>/top<rank>/{class,name,prob}``."""
    out = {"path": row["path"], "id": row["id"]}
    out.update({f"label/{col}": value for col, value in (row.get("labels") or {}).items()})
    for head, ranks in row["predictions"].items():
        for r in ranks:
            out.update({f"{head}/top{r['rank']}/{key}": r[key] for key in ("class", "name", "prob")})
    return out


def write_rows(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """``rows`` as JSON Lines (``.jsonl``) or CSV (``.csv``), through a temporary file and a rename."""
    from fusionkit.engine.checkpoint import atomic_write_bytes

    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        return atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    flat = [flat_row(r) for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in flat for k in r)))
    writer.writeheader()
    writer.writerows(flat)
    return atomic_write_bytes(path, buf.getvalue().encode())

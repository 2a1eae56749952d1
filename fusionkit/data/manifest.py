"""Manifests: the list of items of a dataset, read from CSV (with a header row) or JSONL.

Columns (keys, for JSONL):

==============  =================================================================================
``path``        media file, relative to ``root`` (default: the manifest's folder) or absolute
``start/end``   optional span in seconds (``12.5``) or ``[HH:]MM:SS[.fff]`` (EPIC-KITCHENS style);
                empty = the start / end of the media
``id``          optional clip id (default: the row number); test views of one item share it
``audio_path``  optional side audio file (WAV, ...) whose time 0 is the video's time 0
other columns   labels, one per head (``verb``, ``noun``, ``label``, ...)
==============  =================================================================================

A label is a class name or an integer id. With a class-name file (one name per line, line ``i``
is class ``i``) a value equal to a name maps to that name's line, an integer-like value is taken
as the id; without one, integer labels give ``max + 1`` classes named ``"0"``, ``"1"``, ... and
name labels give their sorted distinct names. An empty label is ``-1`` (no target; e.g. a test
split without labels). Errors name the manifest row and the closest class names.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fusionkit.errors import FusionkitError
from fusionkit.registry import closest

RESERVED = ("path", "start", "end", "id", "audio_path")
TIMESTAMP = re.compile(r"^(?:(\d+):)?(\d+):(\d+(?:\.\d*)?)$")


class ManifestError(FusionkitError, ValueError):
    """A manifest that cannot be read; the message names the file and row."""


@dataclass
class Item:
    """One manifest row."""

    row: int
    path: str  # resolved path
    start: float | None = None
    end: float | None = None
    clip_id: str = ""
    audio_path: str | None = None
    labels: dict[str, int] = field(default_factory=dict)


def parse_time(value, where: str = "") -> float | None:
    """Seconds from a number, a numeric string or ``[HH:]MM:SS[.fff]``; None for empty / missing."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    m = TIMESTAMP.match(text)
    if not m:
        raise ManifestError(f"{where}: cannot read time {text!r} (seconds or [HH:]MM:SS[.fff])")
    return int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))


def read_rows(path: str | Path) -> list[dict]:
    """The raw rows of a CSV (header row required) or JSONL manifest (chosen by suffix; ``.json``
    holding a list of objects also works). Files are UTF-8; a byte-order mark (spreadsheet exports)
    is dropped, not read as part of the first column's name."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        text = path.read_text(encoding="utf-8-sig")
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ManifestError(f"{path}:{i}: not valid JSON: {err}") from err
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise ManifestError(f"{path}: row {i} is not a JSON object")
        return rows
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = [dict(r) for r in csv.DictReader(fh, skipinitialspace=True)]
    return [{k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items() if k is not None} for r in rows]


def read_class_names(path: str | Path) -> list[str]:
    """One class name per line (blank lines ignored), line ``i`` is class ``i``."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"class-name file {path} not found")
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ManifestError(f"{path}: duplicate class names {dup[:5]}")
    return names


def _int_like(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    return None


class Manifest:
    """A parsed manifest: :attr:`items`, :attr:`heads` (head → column) and class names per head.

    Args:
        path: the CSV / JSONL file.
        root: folder that relative media paths start from (default: the manifest's folder).
        heads: head name → label column (default: every column outside :data:`RESERVED`).
        classes: head → class-name file (relative paths start from the manifest's folder).
    """

    def __init__(self, path: str | Path, root: str | Path | None = None, heads: Mapping[str, str] | None = None,
                 classes: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path.parent
        rows = read_rows(self.path)
        if not rows:
            raise ManifestError(f"manifest {self.path} has no rows")
        columns = list(dict.fromkeys(k for r in rows for k in r))
        if "path" not in columns:
            raise ManifestError(f"manifest {self.path} has no 'path' column; columns: {columns}")
        if heads is None:
            heads = {c: c for c in columns if c not in RESERVED}
        self.heads: dict[str, str] = dict(heads)
        for head, col in self.heads.items():
            if col not in columns:
                raise ManifestError(f"head {head!r}: column {col!r} is not in {self.path}; closest columns: "
                                    f"{', '.join(closest(col, columns))}")
        classes = dict(classes or {})
        unknown = sorted(set(classes) - set(self.heads))
        if unknown:
            raise ManifestError(f"class-name files given for unknown head(s) {unknown}; heads: {sorted(self.heads)}")
        self.names: dict[str, list[str]] = {}
        for head, col in self.heads.items():
            if head in classes:
                file = Path(classes[head])
                self.names[head] = read_class_names(file if file.is_absolute() else self.path.parent / file)
            else:
                self.names[head] = self._infer_names(head, [r.get(col) for r in rows])
        self.items = [self._item(i, r) for i, r in enumerate(rows)]

    def _infer_names(self, head: str, values: list) -> list[str]:
        present = [v for v in values if v is not None and str(v).strip() != ""]
        ints = [_int_like(v) for v in present]
        if all(i is not None for i in ints):
            if any(i < 0 for i in ints):
                raise ManifestError(f"{self.path}: head {head!r} has negative class ids")
            return [str(i) for i in range(max(ints) + 1)] if ints else []
        if any(i is not None for i in ints):
            raise ManifestError(f"{self.path}: head {head!r} mixes class names and integer ids; give a "
                                f"class-name file (classes: {{{head}: file}})")
        return sorted({str(v).strip() for v in present})

    def _label(self, head: str, value, row: int) -> int:
        if value is None or str(value).strip() == "":
            return -1
        names = self.names[head]
        text = str(value).strip()
        index = self._index.setdefault(head, {n: i for i, n in enumerate(names)})
        if text in index:
            return index[text]
        as_int = _int_like(value)
        if as_int is not None:
            if not 0 <= as_int < len(names):
                raise ManifestError(f"{self.path}, row {row}: {head} id {as_int} is outside [0, {len(names)})")
            return as_int
        raise ManifestError(f"{self.path}, row {row}: unknown {head} class {text!r}; closest names: "
                            f"{', '.join(closest(text, names)) or '(none)'}")

    def _resolve(self, value: str) -> str:
        p = Path(str(value)).expanduser()
        return str(p if p.is_absolute() else self.root / p)

    def _item(self, row: int, r: dict) -> Item:
        if not hasattr(self, "_index"):
            self._index: dict[str, dict[str, int]] = {}
        where = f"{self.path}, row {row}"
        if not r.get("path"):
            raise ManifestError(f"{where}: empty path")
        start, end = parse_time(r.get("start"), where), parse_time(r.get("end"), where)
        if start is not None and start < 0:
            raise ManifestError(f"{where}: negative start {start}")
        if start is not None and end is not None and end <= start:
            raise ManifestError(f"{where}: end ({end}) must be after start ({start})")
        cid = r.get("id")
        return Item(row=row, path=self._resolve(r["path"]), start=start, end=end,
                    clip_id=str(cid) if cid not in (None, "") else str(row),
                    audio_path=self._resolve(r["audio_path"]) if r.get("audio_path") else None,
                    labels={h: self._label(h, r.get(c), row) for h, c in self.heads.items()})

    def check_ids(self, head: str, num_classes: int, what: str) -> None:
        """Raise :class:`ManifestError` naming the first row whose ``head`` id is not below ``num_classes``
        (the classes of the model head ``what`` that trains on it)."""
        for item in self.items:
            value = item.labels.get(head, -1)
            if value >= num_classes:
                names = self.names.get(head) or []
                name = f" ({names[value]!r})" if value < len(names) and names[value] != str(value) else ""
                raise ManifestError(f"{self.path}, row {item.row}: {head} label {value}{name} is outside the "
                                    f"{num_classes} classes of {what}")

    def __len__(self) -> int:
        return len(self.items)

"""The files of a run folder a researcher opens: ``recipe.yaml`` and ``train.log``.

* ``recipe.yaml``: the resolved recipe of the run (``_base_`` merged, overrides applied), written by
  rank 0 when the run starts; ``fusionkit train RUN_DIR/recipe.yaml`` trains the same model again.
  A resumed run (or a fresh one in a folder left by a failed start) whose recipe differs from the
  saved one keeps the saved file as ``recipe.step_<S>.yaml`` (the recipe of the steps up to ``S``)
  and logs one line naming the changed keys: nothing is overwritten silently. Changing a recipe on
  resume is allowed (``train.epochs=...`` to train longer); the checkpoint's weights must still fit.
* ``train.log``: the run's log lines as the console shows them, without markup or colours, and its
  summary table, appended (a resumed run adds to it; each start writes a header line with the date).
  It is line-buffered: a line reaches the file when it is logged, nothing is written per step
  beyond the logged ones.

Metrics (``metrics.jsonl`` / ``metrics.csv``) live in :mod:`fusionkit.engine.metrics_file`, the
TensorBoard events in :mod:`fusionkit.engine.tensorboard_log`, the curves in :mod:`fusionkit.engine.plots`.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from fusionkit.engine.checkpoint import RunDirError, atomic_write_bytes
from fusionkit.errors import describe_os_error

RECIPE_FILE = "recipe.yaml"
LOG_FILE = "train.log"


def recipe_yaml(recipe: Mapping[str, Any]) -> str:
    """``recipe`` as YAML that :func:`fusionkit.load_recipe` reads back to the same dict."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(dict(recipe)))


def read_recipe(path: str | Path) -> dict[str, Any] | None:
    """The recipe saved in ``path`` (a ``recipe.yaml``), or None when it is missing or unreadable."""
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - a missing, cut or hand-edited file: treated as no saved recipe
        return None
    return data if isinstance(data, dict) else None


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def recipe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The keys that differ between two recipes, as ``key: old -> new`` (dotted keys, sorted)."""
    a, b = _flat(old), _flat(new)
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, missing), b.get(key, missing)
        if x != y:
            out.append(f"{key}: {'(none)' if x is missing else x!r} -> {'(none)' if y is missing else y!r}")
    return out


def write_recipe(directory: str | Path, recipe: Mapping[str, Any], step: int) -> str | None:
    """Write ``directory/recipe.yaml``; a saved one that differs is kept as ``recipe.step_<step>.yaml``.
    Returns the line to log about that (None when nothing was kept aside)."""
    directory = Path(directory)
    path = directory / RECIPE_FILE
    text = recipe_yaml(recipe)
    message = None
    try:
        if path.is_file():
            if path.read_text() == text:
                return None
            saved = read_recipe(path)
            changes = recipe_changes(saved, recipe) if saved is not None else []
            if saved is not None and not changes:  # the same recipe written differently (by hand): keep it
                return None
            aside = directory / f"recipe.step_{step}.yaml"
            n = 1
            while aside.exists():
                aside, n = directory / f"recipe.step_{step}.{n}.yaml", n + 1
            path.replace(aside)
            shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
            message = (f"the recipe differs from the saved {path} ({shown or 'unreadable'}): the saved one is kept "
                       f"as {aside.name}")
        atomic_write_bytes(path, text.encode())
    except OSError as err:
        raise RunDirError(f"cannot write the recipe of {directory}: {describe_os_error(err)}") from err
    return message


class LogFile:
    """``train.log`` of a run: plain text lines (rich markup removed), appended, line-buffered."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._file: TextIO | None = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        except OSError as err:
            raise RunDirError(f"cannot write the log {self.path}: {describe_os_error(err)}") from err

    def header(self, what: str) -> None:
        self.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {what}")

    def write(self, message: str) -> None:
        """One log line (rich markup, as the console reads it, is removed)."""
        if self._file is None:
            return
        from rich.errors import MarkupError
        from rich.text import Text

        try:
            plain = Text.from_markup(str(message)).plain
        except MarkupError:  # brackets that are not markup: as given
            plain = str(message)
        self._file.write(plain.rstrip("\n") + "\n")

    def write_renderable(self, renderable: Any) -> None:
        """A rich renderable (the summary table) as plain text, 100 columns wide."""
        if self._file is None:
            return
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=100, color_system=None, force_terminal=False, highlight=False).print(renderable)
        self._file.write(buf.getvalue())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

"""Typed registries: every pluggable piece of fusionkit is registered here by name.

A registry maps a name to a class or factory. Built-ins register themselves with a decorator
when ``import fusionkit`` runs; third-party packages register through the entry-point group
``fusionkit.plugins`` (each entry point names a module, or a callable taking no argument,
that performs its registrations when loaded).

Example::

    from fusionkit.registry import EXPERTS

    @EXPERTS.register("my_vit")
    class MyViT(Expert):
        '''One-line description shown by ``fusionkit list``.'''

    expert = EXPERTS.build("my_vit", depth=4)
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

PLUGIN_GROUP = "fusionkit.plugins"


class UnknownNameError(KeyError):
    """A name that is not in a registry; the message names the registry and close matches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def closest(name: str, choices: list[str], n: int = 3) -> list[str]:
    """The up-to-``n`` entries of ``choices`` most similar to ``name``."""
    return difflib.get_close_matches(name, choices, n=n, cutoff=0.0)[:n]


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    description: str


class Registry(Generic[T]):
    """A named collection of classes or factories of one kind (experts, fusions, heads, ...)."""

    def __init__(self, kind: str, description: str) -> None:
        self.kind = kind
        self.description = description
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str | None = None, *, description: str | None = None) -> Callable[[T], T]:
        """Decorator registering a class or function under ``name`` (default: its ``__name__``).

        ``description`` defaults to the first line of the object's docstring.
        Registering a taken name raises ``ValueError``.
        """

        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if key in self._entries and self._entries[key].obj is not obj:
                raise ValueError(f"{self.kind}: name {key!r} is already registered to {self._entries[key].obj!r}")
            doc = description if description is not None else (getattr(obj, "__doc__", None) or "")
            first = doc.strip().splitlines()[0].strip() if doc.strip() else ""
            self._entries[key] = Entry(key, obj, first)
            return obj

        return deco

    def get(self, name: str) -> T:
        """The object registered as ``name``; ``UnknownNameError`` with close matches otherwise."""
        load_plugins()
        if name not in self._entries:
            names = sorted(self._entries)
            hint = ", ".join(closest(name, names)) or "(registry is empty)"
            raise UnknownNameError(f"unknown name {name!r} in registry '{self.kind}'; closest valid names: {hint}")
        return self._entries[name].obj

    def build(self, name: str, /, **kwargs: Any) -> Any:
        """Call the object registered as ``name`` with ``kwargs``."""
        return self.get(name)(**kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        load_plugins()
        return [self._entries[k] for k in sorted(self._entries)]

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


EXPERTS: Registry[Any] = Registry("experts", "Frozen pretrained networks turning a modality into tokens")
FUSIONS: Registry[Any] = Registry("fusions", "Operators exchanging information between experts at named sites")
HEADS: Registry[Any] = Registry("heads", "Pooling and classification heads")
FRONTENDS: Registry[Any] = Registry("frontends", "Signal front-ends (waveform -> features)")
DATASETS: Registry[Any] = Registry("datasets", "Datasets and manifests")
KERNELS: Registry[Any] = Registry("kernels", "Attention kernel backends")
WINDOWS: Registry[Any] = Registry("windows", "Token groupings for windowed attention")
MODALITIES: Registry[Any] = Registry("modalities", "Batch streams the datasets produce (what an expert can read)")

REGISTRIES: dict[str, Registry[Any]] = {
    r.kind: r for r in (EXPERTS, FUSIONS, HEADS, FRONTENDS, DATASETS, KERNELS, WINDOWS, MODALITIES)
}

_plugins_loaded = False


def load_plugins(force: bool = False) -> list[str]:
    """Load every entry point of the group ``fusionkit.plugins`` once; returns their names.

    A plugin that fails to import is logged and skipped, so one broken package does not
    break the toolkit.
    """
    global _plugins_loaded
    if _plugins_loaded and not force:
        return []
    _plugins_loaded = True
    loaded = []
    for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type(importlib)):
                obj()
            loaded.append(ep.name)
        except Exception as err:  # noqa: BLE001 - a broken plugin must not break fusionkit
            log.warning("fusionkit plugin %r (%s) failed to load: %s", ep.name, ep.value, err)
    return loaded

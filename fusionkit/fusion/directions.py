"""Directions: which expert reads which, one notion for every operator that moves tokens between experts.

A direction has a **query** expert (the one that receives the update), a **key** expert (the one read)
and, for operators that attend, a **window** (a name of the windows registry, or an operator's own
``auto``). ``bca``, ``lateral`` and ``lavish`` take their ``directions`` in the same two forms::

    directions:                                     # named, with per-direction keys
      t2s: {query: spatial, key: temporal, window: time}
      s2t: {query: temporal, key: spatial, window: space}

    directions: [audio->video, video->audio]        # shorthand 'key->query', named <key>_to_<query>

Omitted (``null``): every ordered pair of the joined experts, named ``<key>_to_<query>``, with the
operator's default window. In the named form ``null`` removes one direction (an override such as
``fusion.bca.directions.s2t=null``). A direction without ``window`` gets the operator's default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SHORTHAND = "->"


@dataclass(frozen=True)
class Direction:
    """One direction: ``query`` receives from ``key`` within ``window``; ``options``: operator-specific keys."""

    query: str
    key: str
    window: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.key}->{self.query}" + (f" ({self.window})" if self.window else "")


def _shorthand(op: str, spec: str, experts: Sequence[str]) -> tuple[str, dict[str, str]]:
    key, sep, query = str(spec).partition(SHORTHAND)
    key, query = key.strip(), query.strip()
    if not sep or not key or not query:
        raise ValueError(f"{op}: direction {spec!r} must read 'key->query' with joined experts {list(experts)} "
                         f"(e.g. '{experts[-1]}->{experts[0]}')")
    return f"{key}_to_{query}", {"query": query, "key": key}


def _entries(op: str, spec: Any, experts: Sequence[str]) -> list[tuple[str, Mapping[str, Any] | None]]:
    """``(name, mapping or None)`` of every direction written in ``spec`` (either form)."""
    if spec is None:
        return [(f"{k}_to_{q}", {"query": q, "key": k}) for q in experts for k in experts if q != k]
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, Mapping):
        return [(str(name), entry) for name, entry in spec.items()]
    entries = [_shorthand(op, s, experts) for s in spec]
    names = [n for n, _ in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"{op}: direction listed twice in {list(spec)}")
    return entries


def parse_directions(op: str, experts: Sequence[str], spec: Any, *, window: str | None = "global",
                     options: Sequence[str] = (), same: bool = False) -> dict[str, Direction]:
    """``{name: Direction}`` from a recipe's ``directions`` (see the module docstring).

    Args:
        op: the operator's name, for the errors.
        experts: the joined experts; every query and key must be one of them.
        spec: the recipe's value: ``None``, ``{name: {query, key, window, ...} | None}``, or a list of
            ``'key->query'`` strings.
        window: the default window, or ``None`` for an operator whose directions take no window.
        options: further per-direction keys the operator accepts (bca: ``position``).
        same: whether a direction may read its own expert (LAVISH's uni-modal ablation).
    """
    allowed = ["query", "key", *(["window"] if window is not None else []), *options]
    out: dict[str, Direction] = {}
    for name, entry in _entries(op, spec, list(experts)):
        if entry is None:
            continue
        entry = dict(entry)
        if set(entry) - set(allowed) or not {"query", "key"} <= set(entry):
            raise ValueError(f"{op} direction {name!r} takes {', '.join(allowed)}; got {sorted(entry)}")
        for role in ("query", "key"):
            if entry[role] not in experts:
                raise ValueError(f"{op} direction {name!r}: {role} {entry[role]!r} is not one of the joined "
                                 f"experts {list(experts)}")
        if entry["query"] == entry["key"] and not same:
            raise ValueError(f"{op} direction {name!r}: query and key are both {entry['query']!r}")
        out[name] = Direction(entry.pop("query"), entry.pop("key"), entry.pop("window", window), entry)
    if not out:
        raise ValueError(f"{op}: no directions given (e.g. {{t2s: {{query: spatial, key: temporal}}}} or "
                         f"[{experts[-1]}->{experts[0]}])")
    return out


__all__ = ["Direction", "parse_directions"]

"""What the converters share: :class:`Converter`, :class:`ConvertError` and the key helpers
(:func:`unwrap`, :func:`check_keys`, :func:`leaf_pairs`), imported by each converter module."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from fusionkit.errors import FusionkitError
from fusionkit.experts.pretrained import unwrap_state_dict
from fusionkit.registry import closest

StateDict = dict[str, Tensor]



class ConvertError(FusionkitError, ValueError):
    """A checkpoint that a converter cannot map; the message names the offending keys."""


@dataclass(frozen=True)
class Converter:
    """One entry of :data:`CONVERTERS`: ``convert`` (official -> fusionkit), ``export`` (the inverse)
    and ``describe(state_dict)``, a one-line description of what a fusionkit state dict is (which
    recipe builds the model it loads into)."""

    name: str
    description: str
    convert: Callable[[Mapping[str, Tensor]], StateDict]
    export: Callable[[Mapping[str, Tensor]], StateDict]
    describe: Callable[[Mapping[str, Tensor]], str]


# ---------------------------------------------------------------------------------------------------
# Generic helpers
# ---------------------------------------------------------------------------------------------------

def unwrap(state_dict: Any) -> StateDict:
    """A flat ``{key: tensor}`` from a checkpoint (see :func:`~fusionkit.experts.pretrained.unwrap_state_dict`)."""
    return unwrap_state_dict(state_dict, ConvertError)


WEIGHT_BIAS = ("weight", "bias")


def leaf_pairs(official: str, fusionkit: str, leaves: tuple[str, ...] = WEIGHT_BIAS) -> list[tuple[str, str]]:
    """``[(official.leaf, fusionkit.leaf), ...]`` for one module renamed from ``official`` to ``fusionkit``."""
    return [(f"{official}.{leaf}", f"{fusionkit}.{leaf}") for leaf in leaves]


def _listing(title: str, keys: Iterable[str], suggest_from: Iterable[str] | None = None, limit: int = 12) -> str:
    keys = sorted(keys)
    pool = sorted(suggest_from) if suggest_from is not None else None
    shown = []
    for k in keys[:limit]:
        hint = closest(k, pool, n=1) if pool else []
        shown.append(f"{k} (closest valid: {hint[0]})" if hint else k)
    more = f", … (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"  {title} ({len(keys)}): {', '.join(shown)}{more}"


def check_keys(present: Iterable[str], expected: Iterable[str], what: str, hint: str = "") -> None:
    """Raise one :class:`ConvertError` listing every unknown key (with the closest expected one) and
    every missing key of ``present`` against ``expected``; ``what`` and ``hint`` open the message."""
    present, expected = set(present), set(expected)
    unknown, missing = present - expected, expected - present
    if unknown or missing:
        lines = [f"{what}: the state dict does not match the expected layout{hint}"]
        if unknown:
            lines.append(_listing("unknown keys", unknown, expected))
        if missing:
            lines.append(_listing("missing keys", missing))
        raise ConvertError("\n".join(lines))

"""Which parameters train: a policy from the recipe and a report of the result.

Experts are frozen when built; adapters, fusion operators and heads are created trainable.
A :class:`TrainablePolicy` then unfreezes or freezes parameters by name pattern (``fnmatch``
syntax on ``model.named_parameters()`` names), e.g. the experts' final norms in CAST::

    trainable:
      unfreeze: ["experts.*.pool_norm.*"]
      freeze: []

Every expert's layers also answer to one name scheme, ``experts.<expert>.layers.<i>.<name>`` (``i``
the index in the expert's ``layers``), whatever the module path their parameters are stored under
(``vit.blocks.N`` for timm ViTs, ``blocks.N`` for VideoMAE and AST, ``layers.N`` for Swin; state dicts
and checkpoints keep those names): ``unfreeze: ["experts.*.layers.11.*"]`` trains the last layer of
every 12-layer expert.

A pattern that matches no parameter is an error naming the closest parameter names: a typo in
a recipe must not silently train the wrong set.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from fusionkit.registry import closest


@dataclass(frozen=True)
class TrainablePolicy:
    """Name patterns to unfreeze, then to freeze (freeze wins)."""

    unfreeze: Sequence[str] = field(default_factory=tuple)
    freeze: Sequence[str] = field(default_factory=tuple)

    def apply(self, model: nn.Module) -> nn.Module:
        params = dict(model.named_parameters())
        aliases = {**layer_aliases(model), **{n: n for n in params}}  # a name or layer alias → the stored name
        for patterns, flag in ((self.unfreeze, True), (self.freeze, False)):
            for pattern in patterns:
                hits = {aliases[n] for n in fnmatch.filter(aliases, pattern)}
                if not hits:
                    hint = ", ".join(closest(pattern, list(aliases))) or "(the model has no parameters)"
                    raise ValueError(f"trainable pattern {pattern!r} matches no parameter; closest names: {hint}")
                for name in hits:
                    params[name].requires_grad_(flag)
        return model


def layer_aliases(model: nn.Module) -> dict[str, str]:
    """``experts.<e>.layers.<i>.<name>`` → the parameter's stored name, for every layer of every expert."""
    stored = {id(p): n for n, p in model.named_parameters()}
    experts = getattr(model, "experts", None)
    out: dict[str, str] = {}
    for e, expert in (experts.items() if isinstance(experts, nn.ModuleDict) else ()):
        for i, layer in enumerate(getattr(expert, "layers", ())):
            for n, p in layer.named_parameters():
                out[f"experts.{e}.layers.{i}.{n}"] = stored[id(p)]
    return out


@dataclass(frozen=True)
class ParamRow:
    name: str
    total: int
    trainable: int


def trainable_report(model: nn.Module, depth: int = 1) -> list[ParamRow]:
    """Parameter counts (total, trainable) per module path cut to ``depth`` components, plus a
    final ``total`` row. Shared parameters are counted once."""
    rows: dict[str, list[int]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        module_path = name.split(".")[:-1] or [name]  # group by module, not by tensor name
        key = ".".join(module_path[:depth])
        row = rows.setdefault(key, [0, 0])
        row[0] += p.numel()
        row[1] += p.numel() if p.requires_grad else 0
    out = [ParamRow(k, t, tr) for k, (t, tr) in rows.items()]
    out.append(ParamRow("total", sum(r.total for r in out), sum(r.trainable for r in out)))
    return out


def trainable_names(model: nn.Module) -> set[str]:
    """Names of the parameters that require gradients."""
    return {n for n, p in model.named_parameters() if p.requires_grad}


def render_report(rows: list[ParamRow], title: str = "Parameters") -> "rich.table.Table":  # noqa: F821
    """A rich table of :func:`trainable_report` rows (millions, with percentages)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("module")
    table.add_column("total", justify="right")
    table.add_column("trainable", justify="right")
    table.add_column("%", justify="right")
    for r in rows:
        pct = f"{100 * r.trainable / r.total:.1f}" if r.total else "-"
        style = "bold" if r.name == "total" else None
        table.add_row(r.name, f"{r.total / 1e6:.3f}M", f"{r.trainable / 1e6:.3f}M", pct, style=style)
    return table

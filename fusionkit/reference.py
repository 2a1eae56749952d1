"""The recipe reference (docs/reference.md), generated from the code so that it cannot drift.

For every recipe section that names a registered class (``experts.*``, ``fusion.*``, ``heads.*``,
``data.*``, ``audio.frontend``) it lists each built-in ``type`` with the keys its constructor
takes and their defaults (read from the signature), the keys the graph itself reads, and the
``train`` / ``eval`` keys with the engine's defaults (:mod:`fusionkit.engine.config`). Plugins'
entries are left out (the reference describes what fusionkit ships).

``python -m fusionkit.reference --write docs/reference.md`` regenerates it; a test fails when the
committed file differs from :func:`render`.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

from fusionkit import recipes
from fusionkit.engine import config
from fusionkit.registry import DATASETS, EXPERTS, FRONTENDS, FUSIONS, HEADS, KERNELS, MODALITIES, WINDOWS, Registry

# (section, registry, keys the graph reads itself, keys the graph fills in: never set in a recipe)
SECTIONS = [
    ("experts.NAME", EXPERTS, recipes.EXPERT_KEYS, ()),
    ("fusion.NAME", FUSIONS, recipes.OPERATOR_KEYS, recipes.GRAPH_GIVEN),
    ("heads.NAME", HEADS, recipes.HEAD_KEYS, ("dims", "name")),
    ("data.SPLIT", DATASETS, ("type",), ()),
    ("data.SPLIT.audio.frontend", FRONTENDS, ("type",), ()),
]
NAMES_ONLY = [("attention kernels", KERNELS), ("windows", WINDOWS), ("modalities", MODALITIES)]


def shown(value: Any) -> str:
    """A default as a recipe would write it (no object addresses)."""
    if value is inspect.Parameter.empty:
        return "required"
    text = repr(value)
    return type(value).__name__ if " at 0x" in text or " object>" in text else text.replace("|", "\\|")


def builtin(registry: Registry[Any]) -> Iterator[Any]:
    """The entries fusionkit itself registers (a plugin's are left out)."""
    for entry in registry.entries():
        if getattr(entry.obj, "__module__", "").startswith("fusionkit."):
            yield entry


def arguments(obj: Any, skip: tuple[str, ...]) -> list[str]:
    """Table rows ``| key | default |`` of the keyword arguments a class or factory takes."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return []
    rows = [f"| `{p.name}` | `{shown(p.default)}` |" for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip]
    if any(p.kind == p.VAR_KEYWORD for p in params):
        rows.append("| `**kwargs` | passed on to the wrapped library (experts: checked on the meta device before building) |")
    return rows


def section(title: str, registry: Registry[Any], graph: tuple[str, ...], given: tuple[str, ...]) -> list[str]:
    out = [f"## `{title}`", "", f"{registry.description}. Keys the graph reads: "
           + ", ".join(f"`{k}`" for k in graph) + (
               "; filled in by the graph (never in a recipe): " + ", ".join(f"`{k}`" for k in given) if given else "")
           + ".", ""]
    for entry in builtin(registry):
        out += [f"### `type: {entry.name}`", "", entry.description or "(no description)", ""]
        rows = arguments(entry.obj, (*graph, *given))
        out += ["| key | default |", "|---|---|", *rows, ""] if rows else ["No options.", ""]
    return out


def defaults_table(prefix: str, values: Mapping[str, Any]) -> list[str]:
    rows = []
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            rows += defaults_table(f"{prefix}{key}.", value)
        else:
            rows.append(f"| `{prefix}{key}` | `{shown(value)}` |")
    return rows


def render() -> str:
    """The whole reference as markdown."""
    out = ["# Recipe reference", "",
           "Generated from the code by `python -m fusionkit.reference --write docs/reference.md`; "
           "`tests/test_reference.py` fails when this file and the code disagree. How recipes are "
           "written, inherited and overridden: docs/recipes.md. Top-level sections: "
           + ", ".join(f"`{s}`" for s in recipes.SECTIONS) + ".", ""]
    for title, registry, graph, given in SECTIONS:
        out += section(title, registry, graph, given)
    out += ["## `train`", "", "| key | default |", "|---|---|", *defaults_table("train.", config.TRAIN_DEFAULTS), "",
            "## `eval`", "", "| key | default |", "|---|---|", *defaults_table("eval.", config.EVAL_DEFAULTS), ""]
    for title, registry in NAMES_ONLY:
        out += [f"## {title}", "", "| name | description |", "|---|---|"]
        out += [f"| `{e.name}` | {e.description.replace('|', chr(92) + '|')} |" for e in builtin(registry)] + [""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fusionkit.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="PATH", help="write the reference there (default: print it)")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()

"""``fusionkit config RECIPE [key=value ...] [--json]``: the resolved recipe with every engine default.

Prints the recipe as ``fusionkit train`` would run it (``_base_`` merged, overrides applied), with
its ``train`` and ``eval`` sections completed by every key of :mod:`fusionkit.engine.config` (the one
place the defaults live, so this cannot drift from what the trainer uses). Each ``train.*`` /
``eval.*`` line ends with ``# default`` when it keeps the default, or ``# default: X`` when the recipe
or an override changed it. The output is YAML that ``fusionkit train`` reads back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fusionkit.engine.config import EVAL_DEFAULTS, TRAIN_DEFAULTS, eval_config, train_config

ENGINE_SECTIONS = {"train": TRAIN_DEFAULTS, "eval": EVAL_DEFAULTS}
COMMENT_COLUMN = 44


def resolved_recipe(recipe: Any, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The loaded recipe with its ``train`` and ``eval`` sections filled with every default (validated)."""
    from fusionkit.recipes import load_recipe

    cfg = load_recipe(recipe, list(overrides))
    cfg["train"], cfg["eval"] = train_config(cfg), eval_config(cfg)
    return cfg


def flow(value: Any) -> str:
    """``value`` as one line of YAML (flow style)."""
    import yaml

    return yaml.safe_dump([value], default_flow_style=True, width=1_000_000).strip()[1:-1]


def _section_lines(values: Mapping[str, Any], defaults: Mapping[str, Any], indent: int) -> list[str]:
    lines = []
    pad = "  " * indent
    for key, default in defaults.items():
        value = values[key]
        if isinstance(default, Mapping) and key != "loss_weights":
            lines.append(f"{pad}{key}:")
            lines.extend(_section_lines(value, default, indent + 1))
            continue
        text = f"{pad}{key}: {flow(value)}"
        note = "# default" if value == default else f"# default: {flow(default)}"
        lines.append(f"{text.ljust(COMMENT_COLUMN)}  {note}")
    return lines


def render(cfg: Mapping[str, Any]) -> str:
    """The text of ``fusionkit config``: YAML of a :func:`resolved_recipe`, its engine keys annotated."""
    from omegaconf import OmegaConf

    rest = {k: v for k, v in cfg.items() if k not in ENGINE_SECTIONS}
    parts = [OmegaConf.to_yaml(OmegaConf.create(rest)).rstrip("\n")] if rest else []
    for name, defaults in ENGINE_SECTIONS.items():
        parts.append("\n".join([f"{name}:", *_section_lines(cfg[name], defaults, 1)]))
    return "\n".join(parts) + "\n"

"""The ``fusionkit`` command line (also ``python -m fusionkit``).

Sub-commands:
    list [--json]                       every registry with its names and one-line descriptions
    demo                                a short smoke run of experts, kernels and windows on synthetic media
    describe RECIPE [overrides] [--json] parameters, GFLOPs per view and the expert graph of a recipe
    convert NAME IN OUT                 official checkpoints to fusionkit state dicts (safetensors)
    train RECIPE [key=value ...]        train from the recipe's data section (torchrun for several GPUs)
    eval RECIPE --checkpoint C          evaluate a checkpoint (multi-view, per-head metrics)
    predict RECIPE --video FILE         top-5 per head for one media file

Commands that live with their feature (describe, convert, the engine's train / eval / predict) add
themselves through ``add_command``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def cmd_list(args: argparse.Namespace) -> int:
    from fusionkit.registry import REGISTRIES

    if args.json:
        print(json.dumps({kind: reg.names() for kind, reg in REGISTRIES.items()}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for kind, reg in REGISTRIES.items():
        table = Table(title=f"{kind}: {reg.description}", title_justify="left", min_width=72)
        table.add_column("name", style="bold cyan", no_wrap=True)
        table.add_column("description")
        for entry in reg.entries():
            table.add_row(entry.name, entry.description)
        if not len(reg):
            table.add_row("-", "(none registered yet)")
        console.print(table)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fusionkit.demo import run_demo

    return run_demo(frames=args.frames, size=args.size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusionkit", description="Modular multimodal fusion toolkit for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list registered experts, fusion operators, heads, kernels, ...")
    p.add_argument("--json", action="store_true", help="print {registry: [names]} as JSON")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("demo", help="smoke demo: tiny random experts on a synthetic clip")
    p.add_argument("--frames", type=int, default=16, help="frames of the synthetic clip (default 16)")
    p.add_argument("--size", type=int, default=64, help="frame size in pixels (default 64)")
    p.set_defaults(func=cmd_demo)

    from fusionkit import converters, describe
    from fusionkit.engine import commands

    for module in (describe, converters, commands):
        module.add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import fusionkit  # noqa: F401 - registers the built-ins

    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

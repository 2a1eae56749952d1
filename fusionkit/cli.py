"""The ``fusionkit`` command line (also ``python -m fusionkit``).

Sub-commands:
    list [--json]                       every registry with its names and one-line descriptions
    demo                                a short smoke run of experts, kernels and windows on synthetic media
    describe RECIPE [overrides] [--json] parameters, GFLOPs per view and the expert graph of a recipe
    convert NAME IN OUT                 official checkpoints to fusionkit state dicts (safetensors)
    train RECIPE [key=value ...]        train from the recipe's data section (torchrun for several GPUs)
    eval RECIPE --checkpoint C          evaluate a checkpoint (multi-view, per-head metrics)
    predict RECIPE --video FILE         top-5 per head for one media file
    inspect RECIPE --video FILE         cross-attention entropy per layer of every fusion direction

Commands that live with their feature (describe, convert, the engine's train / eval / predict) add
themselves through ``add_command``. ``key=value`` overrides may stand anywhere after ``RECIPE``
(``fusionkit eval tiny --checkpoint C train.seed=1``).

Errors: a :class:`~fusionkit.errors.FusionkitError` (a bad recipe key, a missing or unreadable file, a
checkpoint that does not fit, ...), an ``OSError`` (disk full, permission denied) and Ctrl-C end with
one line on stderr, ``error: <message>``, and exit status 2; ``--debug`` (anywhere on the command
line) or ``FUSIONKIT_DEBUG=1`` re-raises them with the traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence

from fusionkit import __version__
from fusionkit.errors import FusionkitError, debug_requested, describe_os_error, one_line

OVERRIDE = re.compile(r"^[^-=][^=]*=")  # key=value (not an option)


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
    from fusionkit.recipes import recipe_description, recipe_index

    table = Table(title="recipes: named recipes on the search path ($FUSIONKIT_RECIPES, packaged, plugins)",
                  title_justify="left", min_width=72)
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("description")
    for name, path in recipe_index().items():
        table.add_row(name, recipe_description(path))
    console.print(table)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fusionkit.demo import run_demo

    return run_demo(frames=args.frames, size=args.size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusionkit", description="Modular multimodal fusion toolkit for PyTorch")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also FUSIONKIT_DEBUG=1); allowed anywhere")
    parser.add_argument("--version", action="version", version=f"fusionkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list registered experts, fusion operators, heads, kernels, ...")
    p.add_argument("--json", action="store_true", help="print {registry: [names]} as JSON")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("demo", help="smoke demo: tiny random experts on a synthetic clip")
    p.add_argument("--frames", type=int, default=16, help="frames of the synthetic clip (default 16)")
    p.add_argument("--size", type=int, default=64, help="frame size in pixels (default 64)")
    p.set_defaults(func=cmd_demo)

    from fusionkit import converters, describe
    from fusionkit.engine import ablate, bench, commands, export, inspection, plots

    for module in (describe, converters, commands, ablate, plots, bench, export, inspection):
        module.add_command(sub)
    return parser


def _subparser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The sub-command's parser (for its usage line in an error), else ``parser``."""
    for action in parser._actions:  # noqa: SLF001 - argparse keeps sub-parsers here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return action.choices.get(getattr(args, action.dest, None), parser)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv`` with ``key=value`` overrides accepted anywhere after ``RECIPE``.

    argparse gives a ``nargs="*"`` positional only the values right after the one before it; the
    ``key=value`` strings it leaves over are appended to ``overrides`` in their order (like
    ``parse_intermixed_args``, which does not work with sub-commands). Anything else left over is an
    error of the sub-command.
    """
    args, extras = parser.parse_known_args(list(argv))
    rest = extras
    if extras and isinstance(getattr(args, "overrides", None), list):
        args.overrides = [*args.overrides, *(a for a in extras if OVERRIDE.match(a))]
        rest = [a for a in extras if not OVERRIDE.match(a)]
    if rest:
        _subparser(parser, args).error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def report(message: str, status: int = 2) -> int:
    """Print ``error: <message>`` as one line on stderr; returns ``status``."""
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    prefix = "\033[1;31merror:\033[0m" if tty else "error:"
    print(f"{prefix} {one_line(message)}", file=sys.stderr, flush=True)
    return status


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace, debug: bool = False) -> int:
    """``func(args)``, with fusionkit's errors, OS errors and Ctrl-C as one line on stderr (status 2)."""
    try:
        import fusionkit  # noqa: F401 - registers the built-ins

        return func(args)
    except FusionkitError as err:
        if debug:
            raise
        return report(str(err), err.exit_code)
    except KeyboardInterrupt as err:
        if debug:
            raise
        return report(str(err) if str(err) else "interrupted (Ctrl-C)", 2)
    except OSError as err:
        if debug:
            raise
        return report(describe_os_error(err), 2)


def split_debug(argv: Sequence[str] | None) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (allowed anywhere), and whether a traceback was asked for."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or debug_requested()
    return [a for a in argv if a != "--debug"], debug


def main(argv: Sequence[str] | None = None) -> int:
    argv, debug = split_debug(argv)
    parser = build_parser()
    args = parse_args(parser, argv)
    return run_command(args.func, args, debug)


if __name__ == "__main__":
    sys.exit(main())

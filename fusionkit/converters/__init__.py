"""Checkpoint converters: official layouts of other code bases <-> fusionkit state dicts.

A converter is an entry of :data:`CONVERTERS` (name -> :class:`Converter`) with two functions:
``convert`` (official layout -> fusionkit keys) and ``export`` (fusionkit -> official layout, the
exact inverse). The public entry points are::

    convert("cast-official", state_dict)  -> {fusionkit key: tensor}
    export("cast-official", state_dict)   -> {official key: tensor}
    convert_file("cast-official", "cast_ek100.pth", "cast_ek100.safetensors")

and the ``fusionkit convert NAME IN OUT`` command (:func:`add_command`). One module per code base:

* :mod:`fusionkit.converters.cast`: ``cast-official`` (KHU-VLL/CAST ``STCrossTransformer``) <->
  recipes ``cast`` / ``cast_k400``;
* :mod:`fusionkit.converters.lavish`: ``lavish-official`` (GenjiB/LAVISH AVE ``MMIL_Net`` with a
  ViT) <-> recipe ``lavish_vitb16``;
* :mod:`fusionkit.converters.lavish_swin`: ``lavish-swin-official`` (the same model with its Swin-V2)
  <-> recipe ``lavish_swinv2_l``.

This module holds the table (the shared helpers are in :mod:`fusionkit.converters.base`) and the
file and command-line functions. Every result loads with
``load_state_dict(strict=True)`` into the model that ``fusionkit.build`` makes from the converter's
recipe; unknown and missing official keys fail with one message naming them. See docs/convert.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from torch import Tensor

from fusionkit.converters.base import (ConvertError, Converter, StateDict, check_keys, leaf_pairs,  # noqa: F401
                                       unwrap)
from fusionkit.converters.cast import CAST_CONVERTER, cast_from_official, cast_to_official, cast_variant  # noqa: F401
from fusionkit.converters.lavish import LAVISH_CONVERTER
from fusionkit.converters.lavish_swin import LAVISH_SWIN_CONVERTER
from fusionkit.experts.pretrained import PretrainedError, read_state_dict
from fusionkit.registry import closest

__all__ = ["CONVERTERS", "ConvertError", "Converter", "add_command", "cast_variant", "convert", "convert_file",
           "export", "get_converter", "read_checkpoint", "save_safetensors"]

# ---------------------------------------------------------------------------------------------------
# The table and the public functions
# ---------------------------------------------------------------------------------------------------


CONVERTERS: dict[str, Converter] = {conv.name: conv for conv in (CAST_CONVERTER, LAVISH_CONVERTER,
                                                                      LAVISH_SWIN_CONVERTER)}


def get_converter(name: str) -> Converter:
    """The converter called ``name``; an unknown name fails naming the closest valid names."""
    try:
        return CONVERTERS[name]
    except KeyError:
        raise ConvertError(f"unknown converter {name!r}; closest valid names: "
                           f"{', '.join(closest(name, sorted(CONVERTERS)))}") from None


def convert(name: str, state_dict: Mapping[str, Any]) -> StateDict:
    """Convert a checkpoint in the official layout of converter ``name`` to fusionkit keys.

    ``state_dict`` may be wrapped (``{"model": ...}``, ``{"state_dict": ...}``, DDP ``module.``).
    The result loads with ``load_state_dict(strict=True)`` into the matching recipe's model; its
    tensors may share memory with the input (the renamed ones are the input tensors).
    """
    return get_converter(name).convert(state_dict)


def export(name: str, state_dict: Mapping[str, Any]) -> StateDict:
    """The inverse of :func:`convert`: a fusionkit state dict to the official layout of ``name``.
    Split tensors (e.g. the B-CA q / kv projections) are views of the input."""
    return get_converter(name).export(state_dict)


def read_checkpoint(path: str | os.PathLike[str]) -> StateDict:
    """Read ``.safetensors`` or a torch checkpoint (``weights_only``; an ``args`` namespace, as the
    official training scripts save, is allowed) into a flat, unwrapped ``{key: tensor}``."""
    try:
        return read_state_dict(path)
    except PretrainedError as err:
        raise ConvertError(str(err)) from err


def save_safetensors(tensors: Mapping[str, Tensor], path: str | os.PathLike[str],
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` to ``path`` atomically: into a temporary file in the same folder, then
    ``os.replace``. Every tensor is saved contiguous, on the CPU, with its own memory."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    own = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(own, tmp, metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def convert_file(name: str, in_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                 *, reverse: bool = False) -> StateDict:
    """Read ``in_path``, convert it with converter ``name`` (``reverse=True``: export fusionkit ->
    official) and write ``out_path`` as safetensors, atomically. Returns the converted tensors."""
    conv = get_converter(name)
    sd = read_checkpoint(in_path)
    out = (conv.export if reverse else conv.convert)(sd)
    save_safetensors(out, out_path, {"format": "pt", "fusionkit_converter": name,
                                     "direction": "export" if reverse else "convert",
                                     "source": Path(in_path).name})
    return out


# ---------------------------------------------------------------------------------------------------
# Command line: fusionkit convert NAME IN OUT
# ---------------------------------------------------------------------------------------------------

def cmd_convert(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    # a ConvertError (a FusionkitError) or an OSError goes through the CLI's one error path
    # (fusionkit.cli.run_command: one line on stderr, exit status 2)
    conv = get_converter(args.name)
    sd = read_checkpoint(args.input)
    if args.ignore:
        sd = {k: v for k, v in sd.items() if not any(fnmatch.fnmatchcase(k, p) for p in args.ignore)}
    out = (conv.export if args.export else conv.convert)(sd)
    save_safetensors(out, args.output, {"format": "pt", "fusionkit_converter": conv.name,
                                        "direction": "export" if args.export else "convert",
                                        "source": Path(args.input).name})
    what = conv.describe(out)
    console = Console()
    table = Table(title=f"fusionkit convert {conv.name}{' --export' if args.export else ''}",
                  title_justify="left", show_header=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    table.add_row("input", f"{args.input} ({len(sd)} tensors)")
    table.add_row("tensors converted", str(len(out)))
    table.add_row("parameters", f"{sum(v.numel() for v in out.values()):,}")
    table.add_row("model", what)
    table.add_row("output", str(Path(args.output)))
    console.print(table)
    return 0


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``convert NAME IN OUT`` to an ``argparse`` sub-parsers object; returns the sub-parser."""
    names = ", ".join(sorted(CONVERTERS))
    p = subparsers.add_parser(
        "convert", help="convert an official checkpoint to fusionkit keys (safetensors)",
        description="Convert a checkpoint in another code base's layout to fusionkit keys (or back with "
                    f"--export) and write it as safetensors. Converters: {names}.")
    p.add_argument("name", metavar="NAME", help=f"converter name ({names})")
    p.add_argument("input", metavar="IN", help="input checkpoint (.pth/.pt/.bin/.ckpt or .safetensors); "
                                               "model/module/state_dict wrappers are unwrapped")
    p.add_argument("output", metavar="OUT", help="output .safetensors file (written atomically)")
    p.add_argument("--export", action="store_true",
                   help="the inverse: read a fusionkit state dict and write the official layout")
    p.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                   help="drop input keys matching this glob before converting (repeatable), "
                        "e.g. --ignore 'clip_proj*'")
    p.set_defaults(func=cmd_convert)
    return p

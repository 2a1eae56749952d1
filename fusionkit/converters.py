"""Checkpoint converters: official layouts of other code bases <-> fusionkit state dicts.

A converter is an entry of :data:`CONVERTERS` (name -> :class:`Converter`) with two functions:
``convert`` (official layout -> fusionkit keys) and ``export`` (fusionkit -> official layout, the
exact inverse). The public entry points are::

    convert("cast-official", state_dict)  -> {fusionkit key: tensor}
    export("cast-official", state_dict)   -> {official key: tensor}
    convert_file("cast-official", "cast_ek100.pth", "cast_ek100.safetensors")

and the ``fusionkit convert NAME IN OUT`` command (:func:`add_command`).

``cast-official`` reads the state dict of the official CAST code (``STCrossTransformer``: CLIP
spatial expert, VideoMAE temporal expert, B-CA in every block) with any number of blocks. It detects
the head variant: the EK100 composition heads (``head_verb`` / ``head_noun``, recipe ``cast``) or the
single adapter-sum head (``noun_last_Adapter`` + ``verb_last_Adapter`` -> ``head``, recipe
``cast_k400``). The result loads with ``load_state_dict(strict=True)`` into the model that
``fusionkit.build`` makes from that recipe. Unknown and missing official keys fail with one message
naming them. See docs/convert.md for the key table.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fusionkit.errors import FusionkitError
from fusionkit.experts.pretrained import PretrainedError, read_state_dict, unwrap_state_dict
from fusionkit.registry import closest

StateDict = dict[str, Tensor]

__all__ = ["CONVERTERS", "ConvertError", "Converter", "add_command", "cast_variant", "convert", "convert_file",
           "export", "get_converter", "read_checkpoint", "save_safetensors"]


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


def _listing(title: str, keys: Iterable[str], suggest_from: Iterable[str] | None = None, limit: int = 12) -> str:
    keys = sorted(keys)
    pool = sorted(suggest_from) if suggest_from is not None else None
    shown = []
    for k in keys[:limit]:
        hint = closest(k, pool, n=1) if pool else []
        shown.append(f"{k} (closest valid: {hint[0]})" if hint else k)
    more = f", … (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"  {title} ({len(keys)}): {', '.join(shown)}{more}"


def _check_keys(present: Iterable[str], expected: Iterable[str], what: str, hint: str = "") -> None:
    present, expected = set(present), set(expected)
    unknown, missing = present - expected, expected - present
    if unknown or missing:
        lines = [f"{what}: the state dict does not match the expected layout{hint}"]
        if unknown:
            lines.append(_listing("unknown keys", unknown, expected))
        if missing:
            lines.append(_listing("missing keys", missing))
        raise ConvertError("\n".join(lines))


# ---------------------------------------------------------------------------------------------------
# CAST (official code, KHU-VLL/CAST) <-> fusionkit recipes cast / cast_k400
# ---------------------------------------------------------------------------------------------------

SPATIAL, TEMPORAL, FUSION = "spatial", "temporal", "bca"   # names used by recipes/cast.yaml
EK100_HEADS = ("verb", "noun")                              # recipes/cast.yaml
SINGLE_HEAD = "action"                                      # recipes/cast_k400.yaml

_WB = ("weight", "bias")


def _leaves(official: str, fusionkit: str, leaves: tuple[str, ...] = _WB) -> list[tuple[str, str]]:
    return [(f"{official}.{leaf}", f"{fusionkit}.{leaf}") for leaf in leaves]


_S, _T, _F = f"experts.{SPATIAL}", f"experts.{TEMPORAL}", f"fusions.{FUSION}"

# one-to-one renames of keys outside the blocks: (official, fusionkit)
_CAST_GLOBAL: list[tuple[str, str]] = [
    ("clip_class_embedding", f"{_S}.class_embedding"),
    ("clip_positional_embedding", f"{_S}.positional_embedding"),
    ("clip_conv1.weight", f"{_S}.conv1.weight"),
    *_leaves("clip_ln_pre", f"{_S}.ln_pre"),
    *_leaves("clip_ln_post", f"{_S}.pool_norm"),
    *_leaves("patch_embed.proj", f"{_T}.patch_embed.proj"),
    *_leaves("vmae_fc_norm", f"{_T}.pool_norm"),
]

# one-to-one renames inside block {i}: (official, fusionkit)
_CAST_BLOCK: list[tuple[str, str]] = [
    # CLIP (OpenAI layout) spatial expert
    *_leaves("blocks.{i}.clip_ln_1", _S + ".blocks.{i}.norm1"),
    ("blocks.{i}.clip_attn.in_proj_weight", _S + ".blocks.{i}.attn.qkv.weight"),
    ("blocks.{i}.clip_attn.in_proj_bias", _S + ".blocks.{i}.attn.qkv.bias"),
    *_leaves("blocks.{i}.clip_attn.out_proj", _S + ".blocks.{i}.attn.proj"),
    *_leaves("blocks.{i}.clip_ln_2", _S + ".blocks.{i}.norm2"),
    *_leaves("blocks.{i}.clip_mlp.c_fc", _S + ".blocks.{i}.mlp.c_fc"),
    *_leaves("blocks.{i}.clip_mlp.c_proj", _S + ".blocks.{i}.mlp.c_proj"),
    *_leaves("blocks.{i}.S_Adapter.D_fc1", _S + ".blocks.{i}.attn_adapter.D_fc1"),
    *_leaves("blocks.{i}.S_Adapter.D_fc2", _S + ".blocks.{i}.attn_adapter.D_fc2"),
    *_leaves("blocks.{i}.S_MLP_Adapter.D_fc1", _S + ".blocks.{i}.mlp_adapter.D_fc1"),
    *_leaves("blocks.{i}.S_MLP_Adapter.D_fc2", _S + ".blocks.{i}.mlp_adapter.D_fc2"),
    # VideoMAE temporal expert (same names apart from the prefix)
    *_leaves("blocks.{i}.norm1", _T + ".blocks.{i}.norm1"),
    ("blocks.{i}.attn.qkv.weight", _T + ".blocks.{i}.attn.qkv.weight"),
    ("blocks.{i}.attn.q_bias", _T + ".blocks.{i}.attn.q_bias"),
    ("blocks.{i}.attn.v_bias", _T + ".blocks.{i}.attn.v_bias"),
    *_leaves("blocks.{i}.attn.proj", _T + ".blocks.{i}.attn.proj"),
    *_leaves("blocks.{i}.norm2", _T + ".blocks.{i}.norm2"),
    *_leaves("blocks.{i}.mlp.fc1", _T + ".blocks.{i}.mlp.fc1"),
    *_leaves("blocks.{i}.mlp.fc2", _T + ".blocks.{i}.mlp.fc2"),
    *_leaves("blocks.{i}.T_Adapter.D_fc1", _T + ".blocks.{i}.attn_adapter.D_fc1"),
    *_leaves("blocks.{i}.T_Adapter.D_fc2", _T + ".blocks.{i}.attn_adapter.D_fc2"),
    *_leaves("blocks.{i}.T_MLP_Adapter.D_fc1", _T + ".blocks.{i}.mlp_adapter.D_fc1"),
    *_leaves("blocks.{i}.T_MLP_Adapter.D_fc2", _T + ".blocks.{i}.mlp_adapter.D_fc2"),
    # B-CA: bottleneck projections and norms
    *_leaves("blocks.{i}.cross_s_down", _F + ".{i}.down." + SPATIAL),
    *_leaves("blocks.{i}.cross_t_down", _F + ".{i}.down." + TEMPORAL),
    *_leaves("blocks.{i}.ln_s_cross", _F + ".{i}.norm." + SPATIAL),
    *_leaves("blocks.{i}.ln_t_cross", _F + ".{i}.norm." + TEMPORAL),
    *_leaves("blocks.{i}.cross_s_up", _F + ".{i}.up." + SPATIAL),
    *_leaves("blocks.{i}.cross_t_up", _F + ".{i}.up." + TEMPORAL),
    # B-CA t2s: spatial queries attend over time to temporal keys
    ("blocks.{i}.t2s_cross.clip_time_pos", _F + ".{i}.cross.t2s.pos_q"),
    ("blocks.{i}.t2s_cross.vmae_time_pos", _F + ".{i}.cross.t2s.pos_kv"),
    *_leaves("blocks.{i}.t2s_cross.t2s_proj", _F + ".{i}.cross.t2s.attn.proj"),
    # B-CA s2t: temporal queries attend over space to spatial keys (its output projection is
    # misnamed t2s_proj in the official code)
    ("blocks.{i}.s2t_cross.vmae_space_pos", _F + ".{i}.cross.s2t.pos_q"),
    ("blocks.{i}.s2t_cross.clip_space_pos", _F + ".{i}.cross.s2t.pos_kv"),
    *_leaves("blocks.{i}.s2t_cross.t2s_proj", _F + ".{i}.cross.s2t.attn.proj"),
]

# fused keys inside block {i}: fusionkit key = cat(official query part, official key/value part) on dim 0
_CAST_JOINED: list[tuple[str, str, str]] = [
    (_F + ".{i}.cross.t2s.attn.qkv.weight", "blocks.{i}.t2s_cross.t2s_q.weight", "blocks.{i}.t2s_cross.t2s_kv.weight"),
    (_F + ".{i}.cross.t2s.attn.qkv.bias", "blocks.{i}.t2s_cross.t2s_q_bias", "blocks.{i}.t2s_cross.t2s_kv_bias"),
    (_F + ".{i}.cross.s2t.attn.qkv.weight", "blocks.{i}.s2t_cross.s2t_q.weight", "blocks.{i}.s2t_cross.s2t_kv.weight"),
    (_F + ".{i}.cross.s2t.attn.qkv.bias", "blocks.{i}.s2t_cross.s2t_q_bias", "blocks.{i}.s2t_cross.s2t_kv_bias"),
]

# heads: variant -> (recipe, [(official, fusionkit)])
_CAST_HEADS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "ek100": ("cast", [
        *_leaves("head_verb", f"heads.{EK100_HEADS[0]}.fc"),     # verb head reads the temporal expert
        *_leaves("head_noun", f"heads.{EK100_HEADS[1]}.fc"),     # noun head reads the spatial expert
    ]),
    "single": ("cast_k400", [
        *_leaves("noun_last_Adapter.D_fc1", f"heads.{SINGLE_HEAD}.adapters.{SPATIAL}.D_fc1"),
        *_leaves("noun_last_Adapter.D_fc2", f"heads.{SINGLE_HEAD}.adapters.{SPATIAL}.D_fc2"),
        *_leaves("verb_last_Adapter.D_fc1", f"heads.{SINGLE_HEAD}.adapters.{TEMPORAL}.D_fc1"),
        *_leaves("verb_last_Adapter.D_fc2", f"heads.{SINGLE_HEAD}.adapters.{TEMPORAL}.D_fc2"),
        *_leaves("head", f"heads.{SINGLE_HEAD}.fc"),
    ]),
}
_VARIANT_NAMES = {"ek100": "EK100 composition heads (head_verb / head_noun)",
                  "single": "single adapter-sum head (noun_last_Adapter + verb_last_Adapter -> head)"}

_OFFICIAL_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_FUSIONKIT_BLOCK = re.compile(rf"^(?:experts\.(?:{SPATIAL}|{TEMPORAL})\.blocks|fusions\.{FUSION})\.(\d+)\.")


def _num_blocks(keys: Iterable[str], pattern: re.Pattern[str], what: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if not found:
        raise ConvertError(f"{what}: no per-block keys found (expected keys like "
                           f"{'blocks.0.clip_ln_1.weight' if pattern is _OFFICIAL_BLOCK else _S + '.blocks.0.norm1.weight'})")
    return max(found) + 1   # a gap shows up as missing keys of that block


def _block_rules(n: int) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    renames = [(o.format(i=i), f.format(i=i)) for i in range(n) for o, f in _CAST_BLOCK]
    joined = [(f.format(i=i), q.format(i=i), kv.format(i=i)) for i in range(n) for f, q, kv in _CAST_JOINED]
    return renames, joined


def _official_variant(keys: set[str]) -> str:
    found = [v for v, (_, rules) in _CAST_HEADS.items() if any(o in keys for o, _ in rules)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConvertError("cast-official: no classification head keys found; expected head_verb.* and "
                           "head_noun.* (EK100 composition) or head.*, noun_last_Adapter.*, verb_last_Adapter.* "
                           "(single head)")
    raise ConvertError("cast-official: the checkpoint mixes both head variants: " + ", ".join(
        sorted(k for k in keys if any(k == o for _, rules in _CAST_HEADS.values() for o, _ in rules))))


def _fusionkit_variant(keys: set[str]) -> str:
    found = [v for v, (_, rules) in _CAST_HEADS.items() if any(f in keys for _, f in rules)]
    if len(found) == 1:
        return found[0]
    heads = sorted({k.split(".")[1] for k in keys if k.startswith("heads.")})
    raise ConvertError(f"cast-official export: cannot tell the head variant from heads {heads or '(none)'}; "
                       f"expected heads {list(EK100_HEADS)} (recipe cast) or [{SINGLE_HEAD!r}] (recipe cast_k400)")


def cast_variant(state_dict: Mapping[str, Tensor]) -> str:
    """``"ek100"`` or ``"single"``: the head variant of an official or fusionkit CAST state dict."""
    keys = set(unwrap(state_dict))
    if any(k.startswith("heads.") for k in keys):
        return _fusionkit_variant(keys)
    return _official_variant(keys)


def cast_from_official(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Official CAST state dict (either head variant, any number of blocks) -> fusionkit keys."""
    sd = unwrap(state_dict)
    keys = set(sd)
    variant = _official_variant(keys)
    n = _num_blocks(keys, _OFFICIAL_BLOCK, "cast-official")
    renames, joined = _block_rules(n)
    renames = _CAST_GLOBAL + renames + _CAST_HEADS[variant][1]
    expected = [o for o, _ in renames] + [k for _, q, kv in joined for k in (q, kv)]
    _check_keys(keys, expected, "cast-official",
                f" ({n} blocks, {_VARIANT_NAMES[variant]}, recipe {_CAST_HEADS[variant][0]!r})")
    out: StateDict = {f: sd[o] for o, f in renames}
    for f, q, kv in joined:
        if sd[q].shape[1:] != sd[kv].shape[1:] or sd[kv].shape[0] != 2 * sd[q].shape[0]:
            raise ConvertError(f"cast-official: {kv} {tuple(sd[kv].shape)} must have twice the rows of "
                               f"{q} {tuple(sd[q].shape)} (keys then values)")
        out[f] = torch.cat([sd[q], sd[kv]], dim=0)
    return out


def cast_to_official(state_dict: Mapping[str, Tensor]) -> StateDict:
    """fusionkit CAST state dict (recipe ``cast`` or ``cast_k400``) -> the official layout."""
    sd = unwrap(state_dict)
    keys = set(sd)
    variant = _fusionkit_variant(keys)
    n = _num_blocks(keys, _FUSIONKIT_BLOCK, "cast-official export")
    renames, joined = _block_rules(n)
    renames = _CAST_GLOBAL + renames + _CAST_HEADS[variant][1]
    expected = [f for _, f in renames] + [f for f, _, _ in joined]
    _check_keys(keys, expected, "cast-official export", f" ({n} blocks, recipe {_CAST_HEADS[variant][0]!r})")
    out: StateDict = {o: sd[f] for o, f in renames}
    for f, q, kv in joined:
        rows = sd[f].shape[0]
        if rows % 3:
            raise ConvertError(f"cast-official export: {f} has {rows} rows, not 3 × dim (q, k, v)")
        out[q], out[kv] = sd[f][: rows // 3], sd[f][rows // 3:]
    return out


def _describe_cast(state_dict: Mapping[str, Tensor]) -> str:
    keys = set(state_dict)
    official = not any(k.startswith("heads.") for k in keys)
    variant = _official_variant(keys) if official else _fusionkit_variant(keys)
    n = _num_blocks(keys, _OFFICIAL_BLOCK if official else _FUSIONKIT_BLOCK, "cast-official")
    return f"CAST, {n} blocks, {_VARIANT_NAMES[variant]}; fusionkit recipe {_CAST_HEADS[variant][0]!r}"


# ---------------------------------------------------------------------------------------------------
# The table and the public functions
# ---------------------------------------------------------------------------------------------------

CONVERTERS: dict[str, Converter] = {
    "cast-official": Converter(
        "cast-official",
        "CAST (KHU-VLL/CAST STCrossTransformer, CLIP + VideoMAE + B-CA) <-> recipes cast / cast_k400",
        cast_from_official, cast_to_official, _describe_cast),
}


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

"""``cast-official``: the official CAST code (KHU-VLL/CAST) <-> fusionkit recipes ``cast`` / ``cast_k400``.

Reads the state dict of the official ``STCrossTransformer`` (CLIP spatial expert, VideoMAE temporal
expert, B-CA in every block) with any number of blocks. It detects the head variant: the EK100
composition heads (``head_verb`` / ``head_noun``, recipe ``cast``) or the single adapter-sum head
(``noun_last_Adapter`` + ``verb_last_Adapter`` -> ``head``, recipe ``cast_k400``). See
docs/convert.md for the key table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from fusionkit.converters.base import ConvertError, Converter, StateDict, check_keys, leaf_pairs, unwrap

SPATIAL, TEMPORAL, FUSION = "spatial", "temporal", "bca"   # names used by recipes/cast.yaml
EK100_HEADS = ("verb", "noun")                              # recipes/cast.yaml
SINGLE_HEAD = "action"                                      # recipes/cast_k400.yaml

_S, _T, _F = f"experts.{SPATIAL}", f"experts.{TEMPORAL}", f"fusions.{FUSION}"

# one-to-one renames of keys outside the blocks: (official, fusionkit)
_CAST_GLOBAL: list[tuple[str, str]] = [
    ("clip_class_embedding", f"{_S}.class_embedding"),
    ("clip_positional_embedding", f"{_S}.positional_embedding"),
    ("clip_conv1.weight", f"{_S}.conv1.weight"),
    *leaf_pairs("clip_ln_pre", f"{_S}.ln_pre"),
    *leaf_pairs("clip_ln_post", f"{_S}.pool_norm"),
    *leaf_pairs("patch_embed.proj", f"{_T}.patch_embed.proj"),
    *leaf_pairs("vmae_fc_norm", f"{_T}.pool_norm"),
]

# one-to-one renames inside block {i}: (official, fusionkit)
_CAST_BLOCK: list[tuple[str, str]] = [
    # CLIP (OpenAI layout) spatial expert
    *leaf_pairs("blocks.{i}.clip_ln_1", _S + ".blocks.{i}.norm1"),
    ("blocks.{i}.clip_attn.in_proj_weight", _S + ".blocks.{i}.attn.qkv.weight"),
    ("blocks.{i}.clip_attn.in_proj_bias", _S + ".blocks.{i}.attn.qkv.bias"),
    *leaf_pairs("blocks.{i}.clip_attn.out_proj", _S + ".blocks.{i}.attn.proj"),
    *leaf_pairs("blocks.{i}.clip_ln_2", _S + ".blocks.{i}.norm2"),
    *leaf_pairs("blocks.{i}.clip_mlp.c_fc", _S + ".blocks.{i}.mlp.c_fc"),
    *leaf_pairs("blocks.{i}.clip_mlp.c_proj", _S + ".blocks.{i}.mlp.c_proj"),
    *leaf_pairs("blocks.{i}.S_Adapter.D_fc1", _S + ".blocks.{i}.attn_adapter.D_fc1"),
    *leaf_pairs("blocks.{i}.S_Adapter.D_fc2", _S + ".blocks.{i}.attn_adapter.D_fc2"),
    *leaf_pairs("blocks.{i}.S_MLP_Adapter.D_fc1", _S + ".blocks.{i}.mlp_adapter.D_fc1"),
    *leaf_pairs("blocks.{i}.S_MLP_Adapter.D_fc2", _S + ".blocks.{i}.mlp_adapter.D_fc2"),
    # VideoMAE temporal expert (same names apart from the prefix)
    *leaf_pairs("blocks.{i}.norm1", _T + ".blocks.{i}.norm1"),
    ("blocks.{i}.attn.qkv.weight", _T + ".blocks.{i}.attn.qkv.weight"),
    ("blocks.{i}.attn.q_bias", _T + ".blocks.{i}.attn.q_bias"),
    ("blocks.{i}.attn.v_bias", _T + ".blocks.{i}.attn.v_bias"),
    *leaf_pairs("blocks.{i}.attn.proj", _T + ".blocks.{i}.attn.proj"),
    *leaf_pairs("blocks.{i}.norm2", _T + ".blocks.{i}.norm2"),
    *leaf_pairs("blocks.{i}.mlp.fc1", _T + ".blocks.{i}.mlp.fc1"),
    *leaf_pairs("blocks.{i}.mlp.fc2", _T + ".blocks.{i}.mlp.fc2"),
    *leaf_pairs("blocks.{i}.T_Adapter.D_fc1", _T + ".blocks.{i}.attn_adapter.D_fc1"),
    *leaf_pairs("blocks.{i}.T_Adapter.D_fc2", _T + ".blocks.{i}.attn_adapter.D_fc2"),
    *leaf_pairs("blocks.{i}.T_MLP_Adapter.D_fc1", _T + ".blocks.{i}.mlp_adapter.D_fc1"),
    *leaf_pairs("blocks.{i}.T_MLP_Adapter.D_fc2", _T + ".blocks.{i}.mlp_adapter.D_fc2"),
    # B-CA: bottleneck projections and norms
    *leaf_pairs("blocks.{i}.cross_s_down", _F + ".{i}.down." + SPATIAL),
    *leaf_pairs("blocks.{i}.cross_t_down", _F + ".{i}.down." + TEMPORAL),
    *leaf_pairs("blocks.{i}.ln_s_cross", _F + ".{i}.norm." + SPATIAL),
    *leaf_pairs("blocks.{i}.ln_t_cross", _F + ".{i}.norm." + TEMPORAL),
    *leaf_pairs("blocks.{i}.cross_s_up", _F + ".{i}.up." + SPATIAL),
    *leaf_pairs("blocks.{i}.cross_t_up", _F + ".{i}.up." + TEMPORAL),
    # B-CA t2s: spatial queries attend over time to temporal keys
    ("blocks.{i}.t2s_cross.clip_time_pos", _F + ".{i}.cross.t2s.pos_q"),
    ("blocks.{i}.t2s_cross.vmae_time_pos", _F + ".{i}.cross.t2s.pos_kv"),
    *leaf_pairs("blocks.{i}.t2s_cross.t2s_proj", _F + ".{i}.cross.t2s.attn.proj"),
    # B-CA s2t: temporal queries attend over space to spatial keys (its output projection is
    # misnamed t2s_proj in the official code)
    ("blocks.{i}.s2t_cross.vmae_space_pos", _F + ".{i}.cross.s2t.pos_q"),
    ("blocks.{i}.s2t_cross.clip_space_pos", _F + ".{i}.cross.s2t.pos_kv"),
    *leaf_pairs("blocks.{i}.s2t_cross.t2s_proj", _F + ".{i}.cross.s2t.attn.proj"),
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
        *leaf_pairs("head_verb", f"heads.{EK100_HEADS[0]}.fc"),     # verb head reads the temporal expert
        *leaf_pairs("head_noun", f"heads.{EK100_HEADS[1]}.fc"),     # noun head reads the spatial expert
    ]),
    "single": ("cast_k400", [
        *leaf_pairs("noun_last_Adapter.D_fc1", f"heads.{SINGLE_HEAD}.adapters.{SPATIAL}.D_fc1"),
        *leaf_pairs("noun_last_Adapter.D_fc2", f"heads.{SINGLE_HEAD}.adapters.{SPATIAL}.D_fc2"),
        *leaf_pairs("verb_last_Adapter.D_fc1", f"heads.{SINGLE_HEAD}.adapters.{TEMPORAL}.D_fc1"),
        *leaf_pairs("verb_last_Adapter.D_fc2", f"heads.{SINGLE_HEAD}.adapters.{TEMPORAL}.D_fc2"),
        *leaf_pairs("head", f"heads.{SINGLE_HEAD}.fc"),
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
    check_keys(keys, expected, "cast-official",
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
    check_keys(keys, expected, "cast-official export", f" ({n} blocks, recipe {_CAST_HEADS[variant][0]!r})")
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


CAST_CONVERTER = Converter(
    "cast-official",
    "CAST (KHU-VLL/CAST STCrossTransformer, CLIP + VideoMAE + B-CA) <-> recipes cast / cast_k400",
    cast_from_official, cast_to_official, _describe_cast)

__all__ = ["CAST_CONVERTER", "cast_from_official", "cast_to_official", "cast_variant"]

"""The cast-official converter: official CAST layouts (both head variants) <-> fusionkit recipes.

Official state dicts are made from the reference key lists (tests/data/cast_official or
$FUSIONKIT_REFERENCE) with distinct random non-zero values in every tensor, so a tensor landing in
the wrong place, or a zero-initialised one being skipped, shows up.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from pathlib import Path

import pytest
import torch

import fusionkit
from fusionkit.cli import main
from fusionkit.converters import CONVERTERS, ConvertError, add_command, cast_variant, convert, convert_file, export
from fusionkit.describe import MetaMode

REFERENCE = Path(os.environ.get("FUSIONKIT_REFERENCE", Path(__file__).resolve().parent / "data" / "cast_official"))
TSV = {"ek100": "cast_official_ek100_composition.tsv", "single": "cast_official_single_head_400.tsv"}
RECIPE = {"ek100": "cast", "single": "cast_k400"}
NAME = "cast-official"

pytestmark = pytest.mark.skipif(not all((REFERENCE / f).is_file() for f in TSV.values()),
                                reason=f"official CAST key lists not found in {REFERENCE}")


def read_tsv(variant: str) -> list[tuple[str, tuple[int, ...], bool]]:
    rows = []
    for line in (REFERENCE / TSV[variant]).read_text().splitlines()[1:]:
        if line.strip():
            key, shape, trainable = line.split("\t")
            rows.append((key, tuple(int(s) for s in shape.split("x")), trainable.strip() == "1"))
    return rows


def nonzero(shape: tuple[int, ...], gen: torch.Generator, scale: float = 0.05) -> torch.Tensor:
    """Values in ±[0.1, 1.1)·scale: never zero, all different within a tensor, small enough for a finite
    forward. A Weyl sequence ``frac(offset + i·φ)`` from one random offset per tensor: as good as random
    numbers for telling tensors and their elements apart, at a fraction of the cost (217M values)."""
    offset = torch.rand((), generator=gen, dtype=torch.float64).item()
    r = torch.arange(math.prod(shape), dtype=torch.float64).mul_(0.6180339887498949).add_(offset).frac_()
    r = r.mul_(2).sub_(1)
    return r.add_(r >= 0, alpha=0.2).sub_(0.1).mul_(scale).to(torch.float32).reshape(shape)


@functools.cache
def _official_state(variant: str, seed: int, blocks: int | None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keep = (lambda k: not k.startswith("blocks.") or int(k.split(".")[1]) < blocks) if blocks else (lambda k: True)
    return {key: nonzero(shape, gen) for key, shape, _ in read_tsv(variant) if keep(key)}


def official_state(variant: str, seed: int = 0, blocks: int | None = None) -> dict[str, torch.Tensor]:
    """Official-layout state dict from the key list (cached: callers get a fresh dict, shared tensors;
    ``blocks`` keeps only blocks 0 … blocks-1)."""
    return dict(_official_state(variant, seed, blocks))


FULL = 12  # blocks of the official models
CASES = [("ek100", 2), ("single", 2),  # every key pattern (all non-block keys, blocks 0-1): seconds
         pytest.param(("ek100", FULL), marks=pytest.mark.slow, id="ek100-full"),
         pytest.param(("single", FULL), marks=pytest.mark.slow, id="single-full")]


def depth_overrides(blocks: int) -> list[str]:
    """The recipe with ``blocks`` layers per expert (224², 16 frames: every other shape as official)."""
    return [] if blocks == FULL else [
        f"experts.spatial.vision_cfg={{image_size: 224, layers: {blocks}, width: 768, patch_size: 16}}",
        f"experts.temporal.depth={blocks}"]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}blocks")
def case(request):
    """(variant, official state dict, converted state dict, model with it loaded strictly): the official
    key list of ``blocks`` blocks (all 12 in the slow cases)."""
    variant, blocks = request.param
    official = official_state(variant, blocks=None if blocks == FULL else blocks)
    converted = convert(NAME, official)
    # built on the meta device (shapes and requires_grad, no initialisation) and given the converted
    # tensors: a strict load checks every name and shape as into a real model
    with MetaMode(build=True):
        model = fusionkit.build(RECIPE[variant], depth_overrides(blocks)).eval()
    result = model.load_state_dict(converted, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert not any(p.is_meta for p in model.parameters())
    return variant, official, converted, model


def small_overrides() -> list[str]:
    """A 2-block, 112² CAST: the same graph as the paper's, cheap enough for a forward in a test."""
    return ["inputs.video=[3,16,112,112]",
            "experts.spatial.vision_cfg={image_size: 112, layers: 2, width: 768, patch_size: 16}",
            "experts.temporal.depth=2", "experts.temporal.img_size=112"]


# --------------------------------------------------------------------------------------------------

def test_table_and_unknown_converter_name():
    assert NAME in CONVERTERS and CONVERTERS[NAME].name == NAME
    with pytest.raises(ConvertError, match="closest valid names: cast-official"):
        convert("cast-oficial", {})
    with pytest.raises(ConvertError, match="cast-official"):
        export("cast_official", {})


def test_converts_every_key_and_loads_strictly(case):
    variant, official, converted, model = case
    assert cast_variant(official) == variant and cast_variant(converted) == variant
    n_blocks = len(model.experts["spatial"].layers)
    assert n_blocks == len(model.experts["temporal"].layers) == len({k.split(".")[1] for k in official
                                                                       if k.startswith("blocks.")})
    # four official B-CA q / kv tensors per direction pair fuse into two qkv tensors per direction
    assert len(converted) == len(official) - 4 * n_blocks == len(model.state_dict())
    assert sum(v.numel() for v in converted.values()) == sum(v.numel() for v in official.values())
    if n_blocks == FULL:
        expected_total = {"ek100": 216_808_333, "single": 217_402_384}[variant]
        assert sum(p.numel() for p in model.parameters()) == expected_total
    for key, value in model.state_dict().items():   # every model tensor got a (non-zero) official value
        assert torch.equal(value, converted[key].to(value.dtype)), key
        assert bool((value != 0).all()), key


def test_tensors_land_where_their_role_says(case):
    variant, sd, _, model = case
    spatial, temporal = model.experts["spatial"], model.experts["temporal"]
    bca = model.fusions["bca"]
    assert bca["0"].directions["t2s"][:2] == ("spatial", "temporal")   # (query, key)
    assert bca["0"].directions["s2t"][:2] == ("temporal", "spatial")
    eq = torch.equal
    assert eq(spatial.class_embedding, sd["clip_class_embedding"])
    assert eq(spatial.positional_embedding, sd["clip_positional_embedding"])
    assert eq(spatial.conv1.weight, sd["clip_conv1.weight"])
    assert eq(spatial.ln_pre.weight, sd["clip_ln_pre.weight"])
    assert eq(spatial.pool_norm.weight, sd["clip_ln_post.weight"])
    assert eq(spatial.pool_norm.bias, sd["clip_ln_post.bias"])
    assert eq(temporal.patch_embed.proj.weight, sd["patch_embed.proj.weight"])
    assert eq(temporal.pool_norm.weight, sd["vmae_fc_norm.weight"])
    n = len(spatial.layers)
    for i in sorted({0, n // 2, n - 1}):
        b = f"blocks.{i}."
        s, t, op = spatial.layers[i], temporal.layers[i], bca[str(i)]
        # CLIP
        assert eq(s.norm1.weight, sd[b + "clip_ln_1.weight"])
        assert eq(s.attn.qkv.weight, sd[b + "clip_attn.in_proj_weight"])
        assert eq(s.attn.qkv.bias, sd[b + "clip_attn.in_proj_bias"])
        assert eq(s.attn.proj.weight, sd[b + "clip_attn.out_proj.weight"])
        assert eq(s.norm2.bias, sd[b + "clip_ln_2.bias"])
        assert eq(s.mlp.c_fc.weight, sd[b + "clip_mlp.c_fc.weight"])
        assert eq(s.mlp.c_proj.bias, sd[b + "clip_mlp.c_proj.bias"])
        assert eq(s.attn_adapter.D_fc1.weight, sd[b + "S_Adapter.D_fc1.weight"])
        assert eq(s.attn_adapter.D_fc2.bias, sd[b + "S_Adapter.D_fc2.bias"])
        assert eq(s.mlp_adapter.D_fc2.weight, sd[b + "S_MLP_Adapter.D_fc2.weight"])
        # VideoMAE
        assert eq(t.norm1.weight, sd[b + "norm1.weight"])
        assert eq(t.attn.qkv.weight, sd[b + "attn.qkv.weight"])
        assert t.attn.qkv.bias is None
        assert eq(t.attn.q_bias, sd[b + "attn.q_bias"])
        assert eq(t.attn.v_bias, sd[b + "attn.v_bias"])
        assert eq(t.attn.qkv_bias(), torch.cat([sd[b + "attn.q_bias"], torch.zeros(768), sd[b + "attn.v_bias"]]))
        assert eq(t.attn.proj.weight, sd[b + "attn.proj.weight"])
        assert eq(t.mlp.fc1.weight, sd[b + "mlp.fc1.weight"])
        assert eq(t.mlp.fc2.bias, sd[b + "mlp.fc2.bias"])
        assert eq(t.attn_adapter.D_fc1.bias, sd[b + "T_Adapter.D_fc1.bias"])
        assert eq(t.mlp_adapter.D_fc1.weight, sd[b + "T_MLP_Adapter.D_fc1.weight"])
        # B-CA
        assert eq(op.down["spatial"].weight, sd[b + "cross_s_down.weight"])
        assert eq(op.down["temporal"].bias, sd[b + "cross_t_down.bias"])
        assert eq(op.norm["spatial"].weight, sd[b + "ln_s_cross.weight"])
        assert eq(op.norm["temporal"].bias, sd[b + "ln_t_cross.bias"])
        assert eq(op.up["spatial"].weight, sd[b + "cross_s_up.weight"])
        assert eq(op.up["temporal"].bias, sd[b + "cross_t_up.bias"])
        t2s, s2t = op.cross["t2s"], op.cross["s2t"]
        d = op.width
        assert eq(t2s.pos_q, sd[b + "t2s_cross.clip_time_pos"])     # query side: spatial
        assert eq(t2s.pos_kv, sd[b + "t2s_cross.vmae_time_pos"])    # key side: temporal
        assert eq(s2t.pos_q, sd[b + "s2t_cross.vmae_space_pos"])    # query side: temporal
        assert eq(s2t.pos_kv, sd[b + "s2t_cross.clip_space_pos"])   # key side: spatial
        for name, cross in (("t2s", t2s), ("s2t", s2t)):
            c = f"{b}{name}_cross.{name}_"
            assert eq(cross.attn.qkv.weight[:d], sd[c + "q.weight"])
            assert eq(cross.attn.qkv.weight[d:], sd[c + "kv.weight"])
            assert eq(cross.attn.qkv.bias[:d], sd[c + "q_bias"])
            assert eq(cross.attn.qkv.bias[d:], sd[c + "kv_bias"])
        assert eq(t2s.attn.proj.weight, sd[b + "t2s_cross.t2s_proj.weight"])
        assert eq(s2t.attn.proj.weight, sd[b + "s2t_cross.t2s_proj.weight"])   # misnamed officially
        assert eq(s2t.attn.proj.bias, sd[b + "s2t_cross.t2s_proj.bias"])
    if variant == "ek100":
        assert set(model.heads) == {"verb", "noun"}
        assert list(model.heads["verb"].inputs) == ["temporal"] and list(model.heads["noun"].inputs) == ["spatial"]
        assert eq(model.heads["verb"].fc.weight, sd["head_verb.weight"])
        assert eq(model.heads["noun"].fc.bias, sd["head_noun.bias"])
    else:
        head = model.heads["action"]
        assert eq(head.adapters["spatial"].D_fc1.weight, sd["noun_last_Adapter.D_fc1.weight"])
        assert eq(head.adapters["temporal"].D_fc2.bias, sd["verb_last_Adapter.D_fc2.bias"])
        assert eq(head.fc.weight, sd["head.weight"])


def test_trainable_flags_match_the_official_recipe(case):
    variant, official, _, model = case
    flags = {key: trainable for key, _, trainable in read_tsv(variant)}
    params = dict(model.named_parameters())
    for fk_key, off_keys in _origins(variant).items():
        if not set(off_keys) <= set(official):  # a block beyond this case's depth
            assert all(k.startswith("blocks.") for k in off_keys) and fk_key not in params, fk_key
            continue
        for off_key in off_keys:
            assert params[fk_key].requires_grad == flags[off_key], (fk_key, off_key)


def _origins(variant: str) -> dict[str, list[str]]:
    """fusionkit key -> the official keys it is made of (by converting one-hot marked dicts)."""
    rows = {k: shape for k, shape, _ in read_tsv(variant)}
    names = list(rows)
    # every official tensor filled with its own index (one column is enough to trace it)
    marked = {k: torch.full((rows[k][0], *([1] * (len(rows[k]) - 1))), float(n)) for n, k in enumerate(names)}
    out = {}
    for fk_key, value in convert(NAME, marked).items():
        out[fk_key] = [names[int(n)] for n in value.reshape(value.shape[0], -1)[:, 0].unique().tolist()]
    return out


def test_round_trip_is_identity(case):
    _, official, converted, model = case
    back = export(NAME, converted)
    assert set(back) == set(official)
    for key, value in official.items():
        assert torch.equal(back[key], value), key
    again = export(NAME, model.state_dict())   # from the loaded model, too
    assert all(torch.equal(again[k], official[k]) for k in official)


def test_wrappers_are_unwrapped(case):
    _, official, converted, _ = case
    ddp = {"model": {f"module.{k}": v for k, v in official.items()}, "epoch": 3}
    out = convert(NAME, {"state_dict": ddp})
    assert set(out) == set(converted)


def test_unknown_and_missing_keys_are_named():
    official = official_state("ek100", blocks=2)   # the 2-block case's dict (cached)
    bad = dict(official)
    bad["blocks.1.clip_attn.in_proj_weigth"] = bad.pop("blocks.1.clip_attn.in_proj_weight")
    bad["clip_proj"] = torch.ones(768, 512)
    with pytest.raises(ConvertError) as err:
        convert(NAME, bad)
    msg = str(err.value)
    assert "unknown keys (2)" in msg and "blocks.1.clip_attn.in_proj_weigth" in msg and "clip_proj" in msg
    assert "closest valid: blocks.1.clip_attn.in_proj_weight" in msg
    assert "missing keys (1): blocks.1.clip_attn.in_proj_weight" in msg
    # a missing head is named too
    nohead = {k: v for k, v in official.items() if k != "head_noun.bias"}
    with pytest.raises(ConvertError, match="head_noun.bias"):
        convert(NAME, nohead)
    # mixed variants and no head at all
    with pytest.raises(ConvertError, match="both head variants"):
        convert(NAME, {**official, "head.weight": torch.ones(400, 768)})
    with pytest.raises(ConvertError, match="no classification head"):
        convert(NAME, {k: v for k, v in official.items() if not k.startswith("head_")})
    # a fusionkit state dict that is not CAST fails in export with the key named
    with pytest.raises(ConvertError, match="heads.verb.fc.weight"):
        export(NAME, {k: v for k, v in convert(NAME, official).items() if k != "heads.verb.fc.weight"})


@pytest.mark.slow  # two models and their forward: about 15 s
def test_any_number_of_blocks_and_functional_round_trip():
    """A 2-block CAST: official keys of blocks 0-1 only convert and load; the output is unchanged by
    export -> convert -> load into a fresh model."""
    torch.manual_seed(0)
    a = fusionkit.build("cast", small_overrides()).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():   # every parameter non-zero (up-projections start at zero)
        for key, p in a.named_parameters():
            norm_weight = key.endswith("weight") and p.ndim == 1   # LayerNorm scales around 1
            p.copy_(nonzero(tuple(p.shape), gen) + (1.0 if norm_weight else 0.0))
    official = export(NAME, a.state_dict())
    assert {int(k.split(".")[1]) for k in official if k.startswith("blocks.")} == {0, 1}
    b = fusionkit.build("cast", small_overrides()).eval()
    b.load_state_dict(convert(NAME, official), strict=True)
    video = torch.randn(1, 3, 16, 112, 112, generator=gen)
    with torch.no_grad():
        ya, yb = a({"video": video}), b({"video": video})
    assert set(ya) == {"verb", "noun"}
    for name in ya:
        assert torch.isfinite(ya[name]).all()
        assert torch.equal(ya[name], yb[name]), name


def test_convert_file_and_cli(tmp_path):
    from safetensors.torch import load_file

    official = official_state("single", blocks=1)   # the converter takes any number of blocks
    src = tmp_path / "cast_k400_official.pth"
    torch.save({"model": official, "epoch": 1, "args": argparse.Namespace(lr=1e-3)}, src)
    parser = argparse.ArgumentParser(prog="fusionkit")
    add_command(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "out" / "cast_k400.safetensors"
    args = parser.parse_args(["convert", NAME, str(src), str(out)])
    assert args.func(args) == 0
    loaded = load_file(str(out))
    expected = convert(NAME, official)
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]   # temp file replaced
    # back to the official layout through the file API (split q / kv views saved as own tensors)
    back = tmp_path / "official.safetensors"
    convert_file(NAME, out, back, reverse=True)
    again = load_file(str(back))
    assert set(again) == set(official) and all(torch.equal(again[k], official[k]) for k in official)
    # a failing conversion raises ConvertError naming the key (the CLI: one line, exit 2) and writes nothing
    bad = tmp_path / "bad.pth"
    torch.save({**official, "blocks.0.surprise": torch.ones(1)}, bad)
    args = parser.parse_args(["convert", NAME, str(bad), str(tmp_path / "bad.safetensors")])
    with pytest.raises(ConvertError, match="blocks.0.surprise"):
        args.func(args)
    assert main(["convert", NAME, str(bad), str(tmp_path / "bad.safetensors")]) == 2
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(ConvertError, match="blocks.0.surprise"):
        convert_file(NAME, bad, tmp_path / "bad.safetensors")
    args = parser.parse_args(["convert", NAME, str(bad), str(tmp_path / "ok.safetensors"), "--ignore", "*surprise"])
    assert args.func(args) == 0


@pytest.mark.slow
def test_full_model_output_unchanged_by_round_trip(case):
    variant, _, converted, meta = case
    if variant != "ek100":
        pytest.skip("one forward pair per depth is enough")
    model = fusionkit.build(RECIPE[variant], depth_overrides(len(meta.experts["spatial"].layers))).eval()  # real
    model.load_state_dict(converted, strict=True)
    video = torch.randn(1, 3, 16, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model({"video": video})
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for p in model.parameters():
            p.zero_()
        model.load_state_dict(convert(NAME, export(NAME, state)), strict=True)
        after = model({"video": video})
    for name in before:
        assert torch.isfinite(before[name]).all()
        assert torch.equal(before[name], after[name]), name

"""The lavish-official converter: the official LAVISH AVE model's state dict (GenjiB/LAVISH,
``AVE/nets/net_trans.py`` ``MMIL_Net`` with a ViT) <-> recipe ``lavish_vitb16``.

The official layout is written out here from the official code, apart from the converter's tables:
``my_vit`` keeps the timm ViT as ``ViT.v``; four ``VisualAdapter`` lists (``audio`` / ``vis`` ×
``p1`` / ``p2``) of one adapter per block; the head ``mlp_class`` -> ``mlp_class_2``. Every tensor holds
distinct non-zero values, so a tensor landing in the wrong place shows up.
"""

from __future__ import annotations

import argparse
import math

import pytest
import torch

import fusionkit
from fusionkit.cli import main
from fusionkit.converters import CONVERTERS, ConvertError, add_command, convert, convert_file, export
from fusionkit.describe import MetaMode

NAME, RECIPE, DIM = "lavish-official", "lavish_vitb16", 768


def official_shapes(blocks: int, dim: int = DIM, m: int = 2, r: int = 8, classes: int = 29) -> dict[str, tuple]:
    """Key -> shape of ``MMIL_Net(vis_encoder_type=vit).state_dict()`` for a ViT-B/16 of ``blocks`` blocks
    (is_gate, is_bn, is_before_layernorm, is_post_layernorm, num_conv_group=2), without ``ViT.v.head``."""
    shapes: dict[str, tuple] = {"ViT.v.cls_token": (1, 1, dim), "ViT.v.pos_embed": (1, 197, dim),
                                "ViT.v.patch_embed.proj.weight": (dim, 3, 16, 16),
                                "ViT.v.patch_embed.proj.bias": (dim,),
                                "ViT.v.norm.weight": (dim,), "ViT.v.norm.bias": (dim,),
                                "mlp_class.weight": (512, 2 * dim), "mlp_class.bias": (512,),
                                "mlp_class_2.weight": (classes, 512), "mlp_class_2.bias": (classes,)}
    for i in range(blocks):
        b = f"ViT.v.blocks.{i}."
        for name, (out, inp) in {"attn.qkv": (3 * dim, dim), "attn.proj": (dim, dim), "mlp.fc1": (4 * dim, dim),
                                 "mlp.fc2": (dim, 4 * dim)}.items():
            shapes[b + name + ".weight"], shapes[b + name + ".bias"] = (out, inp), (out,)
        for norm in ("norm1", "norm2"):
            shapes[b + norm + ".weight"], shapes[b + norm + ".bias"] = (dim,), (dim,)
        for stream in ("audio", "vis"):
            for part in ("p1", "p2"):
                a = f"{stream}_adapter_blocks_{part}.{i}."
                shapes.update({a + "gate": (1,), a + "my_tokens": (m, dim), a + "gate_av": (1,), a + "gate_tk": (1,),
                               a + "down_sampler.weight": (dim // r, dim // 2, 1, 1),
                               a + "up_sampler.weight": (dim, dim // r // 2, 1, 1)})
                for bn, width in (("bn1", dim // r), ("bn2", dim)):
                    for leaf in ("weight", "bias", "running_mean", "running_var"):
                        shapes[f"{a}{bn}.{leaf}"] = (width,)
                    shapes[f"{a}{bn}.num_batches_tracked"] = ()
                for ln in ("ln_before", "ln_post"):
                    shapes[f"{a}{ln}.weight"], shapes[f"{a}{ln}.bias"] = (dim,), (dim,)
    return shapes


def nonzero(shape: tuple, offset: float) -> torch.Tensor:
    """Distinct non-zero values (a Weyl sequence from ``offset``); integer counters stay integers."""
    r = torch.arange(max(math.prod(shape), 1), dtype=torch.float64).mul_(0.6180339887498949).add_(offset).frac_()
    return r.mul_(0.1).add_(0.01).to(torch.float32).reshape(shape)


def official_state(blocks: int) -> dict[str, torch.Tensor]:
    out = {}
    for n, (key, shape) in enumerate(official_shapes(blocks).items()):
        out[key] = torch.tensor(n + 1) if key.endswith("num_batches_tracked") else nonzero(shape, n / 7.0)
    return out


def overrides(blocks: int) -> list[str]:
    return [] if blocks == 12 else [f"experts.video.depth={blocks}"]


CASES = [2, pytest.param(12, marks=pytest.mark.slow, id="12blocks")]


@pytest.fixture(scope="module", params=CASES, ids=lambda b: f"{b}blocks" if isinstance(b, int) else b)
def case(request):
    """(official state dict, converted, model with it loaded strictly)."""
    blocks = request.param
    official = official_state(blocks)
    converted = convert(NAME, official)
    with MetaMode(build=True):
        model = fusionkit.build(RECIPE, overrides(blocks)).eval()
    result = model.load_state_dict(converted, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert not any(p.is_meta for p in model.parameters())
    return official, converted, model


def test_registered_next_to_cast():
    assert set(CONVERTERS) >= {"cast-official", NAME} and CONVERTERS[NAME].name == NAME
    with pytest.raises(ConvertError, match="closest valid names: lavish-official"):
        convert("lavish-oficial", {})


def test_round_trip_is_identity(case):
    official, converted, model = case
    back = export(NAME, converted)
    assert set(back) == set(official)
    for key, value in official.items():
        assert back[key].shape == value.shape and torch.equal(back[key], value), key
    again = export(NAME, model.state_dict())
    assert all(torch.equal(again[k], official[k]) for k in official)


def test_every_tensor_converted_and_loaded(case):
    official, converted, model = case
    assert len(converted) == len(official) == len(model.state_dict())
    assert sum(v.numel() for v in converted.values()) == sum(v.numel() for v in official.values())
    for key, value in model.state_dict().items():
        assert torch.equal(value, converted[key]), key


def test_tensors_land_where_their_role_says(case):
    sd, _, model = case
    vit, op = model.experts["video"].vit, model.fusions["lavish"]
    eq = torch.equal
    assert eq(vit.cls_token, sd["ViT.v.cls_token"]) and eq(vit.pos_embed, sd["ViT.v.pos_embed"])
    assert eq(vit.patch_embed.proj.weight, sd["ViT.v.patch_embed.proj.weight"])
    assert eq(model.experts["video"].final_norm.weight, sd["ViT.v.norm.weight"])
    last = len(vit.blocks) - 1
    assert eq(vit.blocks[last].attn.qkv.weight, sd[f"ViT.v.blocks.{last}.attn.qkv.weight"])
    assert eq(vit.blocks[0].mlp.fc2.bias, sd["ViT.v.blocks.0.mlp.fc2.bias"])
    # forward_vit: vis_adapter_blocks_p1[i](f_v, f_a) adapts video from audio beside the attention,
    # audio_adapter_blocks_p2[i](f_a, f_v) audio from video beside the MLP
    for official, group, direction in (("vis_adapter_blocks_p1", "attn_adapters", "audio_to_video"),
                                       ("audio_adapter_blocks_p1", "attn_adapters", "video_to_audio"),
                                       ("vis_adapter_blocks_p2", "mlp_adapters", "audio_to_video"),
                                       ("audio_adapter_blocks_p2", "mlp_adapters", "video_to_audio")):
        for i in (0, last):
            ad, o = getattr(op[str(i)], group)[direction], f"{official}.{i}."
            assert eq(ad.latents, sd[o + "my_tokens"]) and eq(ad.latent_gate, sd[o + "gate_tk"])
            assert eq(ad.fusion_gate, sd[o + "gate_av"]) and eq(ad.gate, sd[o + "gate"])
            assert eq(ad.down.weight, sd[o + "down_sampler.weight"][..., 0])
            assert eq(ad.up.weight, sd[o + "up_sampler.weight"][..., 0])
            assert eq(ad.norm_before.bias, sd[o + "ln_before.bias"])
            assert eq(ad.norm_after.weight, sd[o + "ln_post.weight"])
            assert eq(ad.down_norm.running_var, sd[o + "bn1.running_var"]) and eq(ad.up_norm.bias, sd[o + "bn2.bias"])
            assert eq(ad.up_norm.num_batches_tracked, sd[o + "bn2.num_batches_tracked"])
    head = model.heads["event"]
    assert list(head.inputs) == ["audio", "video"]      # mlp_class reads cat(a_cls, v_cls)
    assert eq(head.fc1.weight, sd["mlp_class.weight"]) and eq(head.fc2.bias, sd["mlp_class_2.bias"])


def test_unknown_missing_and_misshaped_keys_are_named():
    official = official_state(2)
    bad = dict(official)
    bad["vis_adapter_blocks_p1.1.gate_tK"] = bad.pop("vis_adapter_blocks_p1.1.gate_tk")
    bad["ViT.v.head.weight"] = torch.ones(21843, DIM)      # the frozen ImageNet-21k classifier
    with pytest.raises(ConvertError) as err:
        convert(NAME, bad)
    msg = str(err.value)
    assert "unknown keys (2)" in msg and "ViT.v.head.weight" in msg
    assert "closest valid: vis_adapter_blocks_p1.1.gate_tk" in msg
    assert "missing keys (1): vis_adapter_blocks_p1.1.gate_tk" in msg
    flat = {**official, "audio_adapter_blocks_p2.0.up_sampler.weight": torch.ones(DIM, 48)}
    with pytest.raises(ConvertError, match="audio_adapter_blocks_p2.0.up_sampler.weight has shape"):
        convert(NAME, flat)
    ungated = fusionkit.build(RECIPE, ["experts.video.depth=1", "fusion.lavish.latent_gate=false"])
    with pytest.raises(ConvertError, match="latent_gate"):
        export(NAME, ungated.state_dict())


def test_convert_file_and_cli(tmp_path):
    from safetensors.torch import load_file

    official = official_state(1)
    src = tmp_path / "lavish_ave.pt"
    torch.save({**{f"module.{k}": v for k, v in official.items()}, "ViT.v.head.bias": torch.ones(21843)}, src)
    parser = argparse.ArgumentParser(prog="fusionkit")
    add_command(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "lavish.safetensors"
    assert main(["convert", NAME, str(src), str(out)]) == 2 and not out.exists()   # the classifier is named
    args = parser.parse_args(["convert", NAME, str(src), str(out), "--ignore", "ViT.v.head.*"])
    assert args.func(args) == 0
    loaded = load_file(str(out))
    expected = convert(NAME, official)
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)
    back = tmp_path / "official.safetensors"
    convert_file(NAME, out, back, reverse=True)
    again = load_file(str(back))
    assert set(again) == set(official) and all(torch.equal(again[k], official[k]) for k in official)

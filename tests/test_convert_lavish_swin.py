"""The lavish-swin-official converter: the official LAVISH AVE model with its Swin-V2 (GenjiB/LAVISH,
``AVE/nets/net_trans.py`` ``MMIL_Net`` with ``vis_encoder_type=swin``) <-> recipe ``lavish_swinv2_l``.

The official layout is written out here from the official code and the timm 0.6 Swin-V2 it ran
(stages end with their patch merging; the derived buffers ``relative_coords_table``,
``relative_position_index`` and ``attn_mask`` are saved), apart from the converter's tables. Every
tensor holds distinct non-zero values (``nonzero`` of the ViT converter's tests), so a tensor landing
in the wrong place shows up. Two cases: a small Swin (width 32, depths 1-1-2-1) and the
recipe's own Swin-V2-L (built on the meta device).
"""

from __future__ import annotations

import pytest
import torch
from test_convert_lavish import nonzero  # noqa: E402 - the tests' folder is on the path

import fusionkit
from fusionkit.converters import CONVERTERS, ConvertError, convert, export
from fusionkit.describe import MetaMode

NAME, RECIPE = "lavish-swin-official", "lavish_swinv2_l"
SMALL = {"width": 32, "depths": [1, 1, 2, 1], "heads": [2, 2, 2, 2]}
LARGE = {"width": 192, "depths": [2, 2, 18, 2], "heads": [6, 12, 24, 48]}


def official_shapes(width: int, depths: list[int], heads: list[int], m: int = 2, r: int = 8,
                    window: int = 12) -> dict[str, tuple]:
    """Key -> shape of ``MMIL_Net(vis_encoder_type=swin).state_dict()`` (is_gate, is_bn, both layer
    norms, num_conv_group=2) with its Swin-V2 of stage ``depths``, without ``swin.head`` and the unused
    ``adapter_token_downsampler``."""
    shapes: dict[str, tuple] = {"swin.patch_embed.proj.weight": (width, 3, 4, 4), "swin.patch_embed.proj.bias": (width,),
                                "swin.patch_embed.norm.weight": (width,), "swin.patch_embed.norm.bias": (width,)}
    block = 0
    for s, depth in enumerate(depths):
        d, h = width * 2 ** s, heads[s]
        for b in range(depth):
            o = f"swin.layers.{s}.blocks.{b}."
            shapes.update({o + "attn.qkv.weight": (3 * d, d), o + "attn.q_bias": (d,), o + "attn.v_bias": (d,),
                           o + "attn.logit_scale": (h, 1, 1), o + "attn.cpb_mlp.0.weight": (512, 2),
                           o + "attn.cpb_mlp.0.bias": (512,), o + "attn.cpb_mlp.2.weight": (h, 512),
                           o + "attn.proj.weight": (d, d), o + "attn.proj.bias": (d,),
                           o + "mlp.fc1.weight": (4 * d, d), o + "mlp.fc1.bias": (4 * d,),
                           o + "mlp.fc2.weight": (d, 4 * d), o + "mlp.fc2.bias": (d,)})
            for norm in ("norm1", "norm2"):
                shapes[o + norm + ".weight"], shapes[o + norm + ".bias"] = (d,), (d,)
            for stream in ("audio", "vis"):
                for part in ("p1", "p2"):
                    a = f"{stream}_adapter_blocks_{part}.{block}."
                    shapes.update({a + "gate": (1,), a + "my_tokens": (m, d), a + "gate_av": (1,), a + "gate_tk": (1,),
                                   a + "down_sampler.weight": (d // r, d // 2, 1, 1),
                                   a + "up_sampler.weight": (d, d // r // 2, 1, 1)})
                    for bn, w in (("bn1", d // r), ("bn2", d)):
                        for leaf in ("weight", "bias", "running_mean", "running_var"):
                            shapes[f"{a}{bn}.{leaf}"] = (w,)
                        shapes[f"{a}{bn}.num_batches_tracked"] = ()
                    for ln in ("ln_before", "ln_post"):
                        shapes[f"{a}{ln}.weight"], shapes[f"{a}{ln}.bias"] = (d,), (d,)
            block += 1
        if s < len(depths) - 1:
            o = f"swin.layers.{s}.downsample."
            shapes.update({o + "reduction.weight": (2 * d, 4 * d), o + "norm.weight": (2 * d,), o + "norm.bias": (2 * d,)})
    final = width * 2 ** (len(depths) - 1)
    shapes.update({"swin.norm.weight": (final,), "swin.norm.bias": (final,), "mlp_class.weight": (512, 2 * final),
                   "mlp_class.bias": (512,), "mlp_class_2.weight": (29, 512), "mlp_class_2.bias": (29,)})
    return shapes


def official_state(cfg: dict) -> dict[str, torch.Tensor]:
    out = {}
    for n, (key, shape) in enumerate(official_shapes(cfg["width"], cfg["depths"], cfg["heads"]).items()):
        out[key] = torch.tensor(n + 1) if key.endswith("num_batches_tracked") else nonzero(shape, n / 7.0)
    return out


def derived_buffers(window: int = 12) -> dict[str, torch.Tensor]:
    """What timm 0.6 also saves of block 0 of stage 0 (a shifted block would add ``attn_mask``)."""
    return {"swin.layers.0.blocks.0.attn.relative_coords_table": torch.zeros(1, 2 * window - 1, 2 * window - 1, 2),
            "swin.layers.0.blocks.0.attn.relative_position_index": torch.zeros(window ** 2, window ** 2, dtype=torch.long),
            "swin.layers.0.blocks.0.attn_mask": torch.zeros(16, window ** 2, window ** 2)}


def overrides(cfg: dict) -> list[str]:
    if cfg is LARGE:
        return []
    steps, layer = [], 0
    for s, depth in enumerate(cfg["depths"]):
        steps += list(range(layer, layer + depth))
        layer += depth + 1  # the patch merging that starts the next stage
    return [f"experts.video.embed_dim={cfg['width']}", f"experts.video.depths={cfg['depths']}",
            f"experts.video.num_heads={cfg['heads']}", f"fusion.lavish.steps={steps}"]


@pytest.fixture(scope="module", params=[SMALL, LARGE], ids=["small", "swinv2_l"])
def case(request):
    """(official state dict, converted, model with it loaded strictly)."""
    official = official_state(request.param)
    converted = convert(NAME, {**official, **derived_buffers()})
    with MetaMode(build=True):
        model = fusionkit.build(RECIPE, overrides(request.param)).eval()
    result = model.load_state_dict(converted, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    return official, converted, model, request.param


def test_registered(case):
    assert CONVERTERS[NAME].name == NAME
    official, converted, model, cfg = case
    assert str(cfg["depths"]) in CONVERTERS[NAME].describe(official)
    assert str(cfg["depths"]) in CONVERTERS[NAME].describe(model.state_dict())


def test_round_trip_is_identity_without_the_derived_buffers(case):
    official, converted, model, _ = case
    back = export(NAME, converted)
    assert set(back) == set(official)
    assert all(torch.equal(back[k], official[k]) for k in official)
    assert len(converted) == len(official) == len(model.state_dict())


def test_tensors_land_where_their_role_says(case):
    sd, _, model, cfg = case
    swin, op, eq = model.experts["video"], model.fusions["lavish"], torch.equal
    assert eq(swin.patch_embed.proj.weight, sd["swin.patch_embed.proj.weight"])
    assert eq(swin.final_norm.bias, sd["swin.norm.bias"])
    # block 0 of official stage 1 is fusionkit layer depths[0] + 1 (after the merging)
    first = cfg["depths"][0]
    assert eq(swin.layers[first].body.reduction.weight, sd["swin.layers.0.downsample.reduction.weight"])
    block = swin.layers[first + 1].block
    assert eq(block.attn.qkv.weight, sd["swin.layers.1.blocks.0.attn.qkv.weight"])
    assert eq(block.attn.logit_scale, sd["swin.layers.1.blocks.0.attn.logit_scale"])
    assert eq(block.attn.cpb_mlp[2].weight, sd["swin.layers.1.blocks.0.attn.cpb_mlp.2.weight"])
    # adapters are counted over all blocks of all stages: block 0 of stage 1 is adapter `first`, at the
    # operator's step of that block's layer
    ad = op[str(first + 1)].attn_adapters["audio_to_video"]
    assert eq(ad.latents, sd[f"vis_adapter_blocks_p1.{first}.my_tokens"])
    assert eq(ad.down.weight, sd[f"vis_adapter_blocks_p1.{first}.down_sampler.weight"][..., 0])
    ad = op[str(first + 1)].mlp_adapters["video_to_audio"]
    assert eq(ad.up_norm.running_mean, sd[f"audio_adapter_blocks_p2.{first}.bn2.running_mean"])
    head = model.heads["event"]
    assert list(head.inputs) == ["video", "audio"]   # forward_swin: cat(f_v, f_a)
    assert eq(head.fc1.weight, sd["mlp_class.weight"]) and eq(head.fc2.bias, sd["mlp_class_2.bias"])


def test_unused_official_parameters_and_bad_keys_are_named():
    official = official_state(SMALL)
    extra = {**official, "swin.head.weight": torch.ones(10, 256), "adapter_token_downsampler.0.weight": torch.ones(4, 2)}
    with pytest.raises(ConvertError) as err:
        convert(NAME, extra)
    assert "unknown keys (2)" in str(err.value) and "adapter_token_downsampler.0.weight" in str(err.value)
    missing = dict(official)
    missing.pop("swin.layers.2.blocks.1.attn.q_bias")
    with pytest.raises(ConvertError, match=r"missing keys \(1\): swin.layers.2.blocks.1.attn.q_bias"):
        convert(NAME, missing)
    with pytest.raises(ConvertError, match="no Swin block keys"):
        convert(NAME, {"mlp_class.weight": torch.ones(1)})

"""timm_swin: a timm Swin Transformer V2 per frame, layers = Swin blocks + patch mergings.

Parity is checked against timm's own ``forward_features`` / blocks given the same random weights
(a tiny config: 64² input, window 4, widths 32 → 256, depths 2 each).
"""

from __future__ import annotations

import pytest
import timm
import torch
from einops import rearrange

import fusionkit
import fusionkit.experts.swin  # noqa: F401 - registers timm_swin
from fusionkit.attention import TokenLayout
from fusionkit.experts.swin import SwinBlock, SwinMerge, TimmSwin
from fusionkit.registry import EXPERTS

NAME = "swinv2_tiny_window8_256"
TINY = dict(img_size=64, window_size=4, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4))


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith("norm.weight") or ".norm1.weight" in name or ".norm2.weight" in name else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))


def timm_key(key: str, expert: TimmSwin) -> str:
    """fusionkit key -> timm key, from the stage depths (written independently of the expert's code)."""
    if key.startswith("final_norm."):
        return "norm." + key.split(".", 1)[1]
    if key.startswith("patch_embed."):
        return key
    _, index, kind, rest = key.split(".", 3)
    index = int(index)
    layout = []  # (stage, block or None for the merge)
    for s, depth in enumerate(TINY["depths"]):
        if s > 0:
            layout.append((s, None))
        layout.extend((s, b) for b in range(depth))
    stage, block = layout[index]
    return f"layers.{stage}.downsample.{rest}" if block is None else f"layers.{stage}.blocks.{block}.{rest}"


@pytest.fixture(scope="module")
def pair() -> tuple[TimmSwin, torch.nn.Module]:
    torch.manual_seed(0)
    expert = TimmSwin(NAME, **TINY)
    ref = timm.create_model(NAME, num_classes=0, **TINY).eval()
    randomise(ref)
    ref_sd = ref.state_dict()
    sd = {k: ref_sd[timm_key(k, expert)] for k in expert.state_dict()}
    expert.load_state_dict(sd)
    return expert.eval(), ref


def test_registered_and_frozen(pair) -> None:
    expert, _ = pair
    assert EXPERTS.get("timm_swin") is TimmSwin
    assert not any(p.requires_grad for p in expert.parameters())
    assert TimmSwin(NAME, frozen=False, **TINY).patch_embed.proj.weight.requires_grad


def test_layers_follow_timm_stage_order(pair) -> None:
    expert, ref = pair
    kinds = ["merge" if isinstance(layer, SwinMerge) else "block" for layer in expert.layers]
    assert kinds == ["block", "block"] + ["merge", "block", "block"] * 3
    assert expert.block_layers == [0, 1, 3, 4, 6, 7, 9, 10]
    assert expert.dims == [32, 32, 64, 64, 64, 128, 128, 128, 256, 256, 256]
    assert expert.layers[2].merge is not None and isinstance(expert.layers[3], SwinBlock)
    assert sum(p.numel() for p in expert.parameters()) == sum(p.numel() for p in ref.parameters())


def test_parity_with_timm_forward_features_per_frame(pair) -> None:
    expert, ref = pair
    torch.manual_seed(1)
    video = torch.randn(2, 3, 3, 64, 64)  # (B, C, T, H, W)
    with torch.no_grad():
        out = expert(video)
        feats = ref.forward_features(rearrange(video, "b c t h w -> (b t) c h w"))  # (B·T, 2, 2, 256)
        pooled = expert.pool(out)
        ref_pooled = ref.forward_head(feats, pre_logits=True).reshape(2, 3, -1).mean(1)
    assert out.layout == TokenLayout(3, 2, 2)
    torch.testing.assert_close(out.x, rearrange(feats, "(b t) h w c -> b (t h w) c", t=3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-5)


def test_block_steps_equal_timm_block(pair) -> None:
    expert, ref = pair
    x = torch.randn(2, 8, 8, 64)  # stage 1 grid after the first merge: 8x8, width 64
    layer = expert.layers[4]  # second block of stage 1 (shifted windows)
    assert any(layer.block.shift_size)
    with torch.no_grad():
        tokens = rearrange(x, "b h w c -> b (h w) c")[None].flatten(1, 2)  # one sample, T = 2 frames
        ours = layer.feed_forward(layer.attend(tokens, TokenLayout(2, 8, 8)))
        theirs = ref.layers[1].blocks[1](x)
    torch.testing.assert_close(ours, rearrange(theirs, "b h w c -> (b h w) c")[None], atol=1e-5, rtol=1e-5)


def test_graph_probe_sees_merged_layouts() -> None:
    model = fusionkit.build({"inputs": {"video": [3, 2, 64, 64]},
                             "experts": {"video": {"type": "timm_swin", "name": NAME, **TINY}}})
    dims, layouts = model._probe()
    assert [d["video"] for d in dims] == [32, 32, 64, 64, 64, 128, 128, 128, 256, 256, 256]
    assert [(lay["video"].h, lay["video"].t) for lay in layouts][:4] == [(16, 2), (16, 2), (8, 2), (8, 2)]
    x = torch.randn(1, 3, 2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_tokens({"video": x})["video"].x, model.experts["video"](x).x)

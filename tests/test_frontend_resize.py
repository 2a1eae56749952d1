"""The ``resize`` front-end and an expert that sees the clip through it (a low-resolution video expert)."""

from __future__ import annotations

import pytest
import torch

import fusionkit
from fusionkit.experts.base import build_frontend
from fusionkit.frontends.resize import Resize
from fusionkit.registry import EXPERTS, FRONTENDS


def test_area_is_the_mean_of_each_block():
    video = torch.randn(2, 3, 5, 32, 32)
    out = Resize(8)(video)
    assert out.shape == (2, 3, 5, 8, 8)
    blocks = video.reshape(2, 3, 5, 8, 4, 8, 4).mean(dim=(4, 6))  # every 4x4 block of every frame
    torch.testing.assert_close(out, blocks)
    torch.testing.assert_close(Resize(8)(video[:, :, 0]), blocks[:, :, 0])  # images (B, C, H, W)
    assert Resize(16, mode="nearest")(video).shape == (2, 3, 5, 16, 16)


def test_bad_options_and_inputs_name_the_value():
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):
        Resize(0)
    with pytest.raises(ValueError, match="mode must be one of"):
        Resize(8, mode="cubic")
    with pytest.raises(ValueError, match=r"expected \(B, C, T, H, W\) or \(B, C, H, W\), got \(3, 32\)"):
        Resize(8)(torch.zeros(3, 32))


def test_build_frontend_from_a_recipe_mapping():
    assert FRONTENDS.get("resize") is Resize
    built = build_frontend({"type": "resize", "size": 4})
    assert isinstance(built, Resize) and built.size == 4
    assert isinstance(build_frontend(None), torch.nn.Identity)


def test_video_expert_through_the_frontend_equals_the_expert_on_resized_frames():
    torch.manual_seed(0)
    options = dict(embed_dim=32, depth=2, num_heads=2, img_size=8, patch_size=2, num_frames=4, tubelet_size=1)
    low = EXPERTS.build("videomae_vit", frontend={"type": "resize", "size": 8}, **options)
    plain = EXPERTS.build("videomae_vit", **options)
    plain.load_state_dict(low.state_dict())
    video = torch.randn(2, 3, 4, 32, 32)
    ours = low(video)
    torch.testing.assert_close(ours.x, plain(Resize(8)(video)).x)
    assert ours.x.shape == (2, 4 * 4 * 4, 32) and (ours.layout.t, ours.layout.h, ours.layout.w) == (4, 4, 4)


def test_low_resolution_temporal_expert_keeps_the_token_grid_of_the_image_expert():
    model = fusionkit.build("binding/bca")
    tokens = model.forward_tokens({"video": torch.zeros(1, 3, 8, 32, 32)})
    grids = {e: (t.layout.t, t.layout.h, t.layout.w) for e, t in tokens.items()}
    assert grids == {"spatial": (8, 4, 4), "temporal": (8, 4, 4)}
    assert model.experts["temporal"].frontend.size == 8


def test_pool_modes_reduce_the_patch_tokens_as_documented():
    """``max``: over every patch of every frame; ``frame_max``: each frame's max, averaged over time."""
    expert = EXPERTS.build("timm_vit", name="vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1,
                           embed_dim=8, num_heads=2, frozen=True)
    expert.pool_norm = torch.nn.Identity()  # the reduction alone
    tokens = expert(torch.randn(2, 3, 3, 16, 16))
    extras, patches = tokens.layout.split(tokens.x)  # patches (B, T, N, D): 3 frames of 4 patches
    assert patches.shape == (2, 3, 4, 8)
    torch.testing.assert_close(expert.pool(tokens, "max"), patches.reshape(2, 12, 8).max(dim=1).values)
    per_frame = torch.stack([patches[:, t].max(dim=1).values for t in range(3)], dim=1)
    torch.testing.assert_close(expert.pool(tokens, "frame_max"), per_frame.mean(dim=1))
    torch.testing.assert_close(expert.pool(tokens, "avg"), patches.reshape(2, 12, 8).mean(dim=1))
    with pytest.raises(ValueError, match="unknown pool mode 'min'"):
        expert.pool(tokens, "min")

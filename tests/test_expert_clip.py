"""clip_vit expert against open_clip's own forward with the same weights (tiny towers, fp32 eval)."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

import fusionkit.attention.multihead as multihead
import fusionkit.experts.clip_vit  # noqa: F401 - registers clip_vit
from fusionkit.attention import Attention, TokenLayout, use_backend
from fusionkit.experts import Block, FrameSelect
from fusionkit.experts.clip_vit import ClipViT
from fusionkit.experts.pretrained import PretrainedError
from fusionkit.experts.quick_gelu import QuickGELU as OnePassQuickGELU
from fusionkit.registry import EXPERTS

REFERENCE = Path(__file__).resolve().parent / "data" / "cast_official" / "cast_official_ek100_composition.tsv"
TEXT = dict(context_length=4, vocab_size=16, width=16, heads=1, layers=1)


def vision(**kw) -> dict:
    return dict(width=64, layers=2, head_width=16, image_size=32, patch_size=16, **kw)


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights: every parameter (LN weights, biases, layer scales included) moved off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def reference_and_expert(tmp_path, quick_gelu: bool = False, vision_cfg: dict | None = None, **expert_kw):
    """A random open_clip CLIP (tiny towers) and a ClipViT loaded from its checkpoint file."""
    vision_cfg = vision_cfg or vision()
    model = open_clip.create_model("ViT-B-16", pretrained=None, vision_cfg=vision_cfg, text_cfg=TEXT, embed_dim=24,
                                   force_quick_gelu=quick_gelu)
    randomize(model)
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    expert = ClipViT("ViT-B-16", pretrained=str(path), vision_cfg=vision_cfg, text_cfg=TEXT, embed_dim=24,
                     quick_gelu=quick_gelu, **expert_kw).eval()
    return model.visual.eval(), expert


def frame_tokens(visual, image: torch.Tensor) -> torch.Tensor:
    """open_clip's transformer output for one image: (B, 1 + N, D), CLS first."""
    out = visual.forward_intermediates(image, indices=[len(visual.transformer.resblocks) - 1], output_fmt="NLC",
                                       output_extra_tokens=True, intermediates_only=True)
    return torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_projected_image_feature_matches_open_clip(tmp_path, quick_gelu):
    visual, expert = reference_and_expert(tmp_path, quick_gelu=quick_gelu, project=True)
    act = type(expert.blocks[0].mlp.gelu)
    assert act is (OnePassQuickGELU if quick_gelu else torch.nn.GELU)
    image = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = visual(image)
        got = expert.forward_features(image)
    assert got.shape == (3, 24)
    assert want.abs().mean() > 0.1  # non-trivial
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_quick_gelu_equals_open_clips_forward_bitwise_and_its_gradient(dtype):
    x = (torch.randn(4, 7, 64) * 3).to(dtype).requires_grad_()
    ref = x.detach().clone().requires_grad_()
    grad = torch.randn(4, 7, 64).to(dtype)
    got, want = OnePassQuickGELU()(x), QuickGELU()(ref)
    assert torch.equal(got, want)
    got.backward(grad)
    want.backward(grad)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert ref.grad.abs().mean() > 0.1
    torch.testing.assert_close(x.grad, ref.grad, **tol)


def test_quick_gelu_matters(tmp_path):
    """The QuickGELU flag must change the result, otherwise the parity above could not tell them apart."""
    visual, _ = reference_and_expert(tmp_path, quick_gelu=True, project=True)
    path = tmp_path / "clip.pt"
    gelu = ClipViT("ViT-B-16", pretrained=str(path), vision_cfg=vision(), text_cfg=TEXT, embed_dim=24,
                   quick_gelu=False, project=True).eval()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(gelu.forward_features(image), visual(image), atol=1e-4)


def test_video_tokens_match_open_clip_per_frame(tmp_path):
    visual, expert = reference_and_expert(tmp_path, frame_select={"stride": 2, "offset": 1, "num": 2})
    assert expert.frame_select == FrameSelect(stride=2, offset=1, num=2)
    video = torch.randn(2, 3, 6, 32, 32)
    with torch.no_grad():
        tokens = expert(video)
        per_frame = {k: frame_tokens(visual, video[:, :, k]) for k in range(6)}
        feat = expert.forward_features(video)
    assert tokens.layout == TokenLayout(2, 2, 2, extras=1, per_frame_extras=True)
    assert tokens.x.shape == (2, 2 * 5, 64)
    frames = tokens.x.reshape(2, 2, 5, 64)  # frame-major, each frame's CLS first
    for i, k in enumerate((1, 3)):
        torch.testing.assert_close(frames[:, i], per_frame[k], atol=1e-5, rtol=1e-5)
        for other in set(range(6)) - {k}:
            assert not torch.allclose(frames[:, i], per_frame[other], atol=1e-3)
    # CAST's spatial feature: LN_post(mean over frames of CLS), no projection
    cls = torch.stack([per_frame[1][:, 0], per_frame[3][:, 0]]).mean(0)
    torch.testing.assert_close(feat, visual.ln_post(cls), atol=1e-5, rtol=1e-5)


def test_layers_are_fusionkit_blocks_on_fusionkit_kernels(tmp_path, monkeypatch):
    visual, expert = reference_and_expert(tmp_path)
    assert len(expert.layers) == 2 and expert.dims == [64, 64] and expert.depth == 2
    for block, ref in zip(expert.layers, visual.transformer.resblocks, strict=True):
        assert isinstance(block, Block) and isinstance(block.attn, Attention)
        assert block.window.name == "space" and block.attn.num_heads == 4
        assert torch.equal(block.attn.qkv.weight, ref.attn.in_proj_weight)
        assert torch.equal(block.attn.qkv.bias, ref.attn.in_proj_bias)
        assert torch.equal(block.attn.proj.weight, ref.attn.out_proj.weight)
        assert type(block.mlp) is type(ref.mlp) and isinstance(block.norm1, type(ref.ln_1))
        for ours, theirs in ((block.mlp, ref.mlp), (block.norm1, ref.ln_1), (block.norm2, ref.ln_2)):
            for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
                assert torch.equal(p, q)
    calls = []
    kernel = multihead.attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(multihead, "attention", counting)
    video = torch.randn(1, 3, 3, 32, 32)
    with torch.no_grad(), use_backend("eager"):
        eager = expert(video).x
    with torch.no_grad(), use_backend("sdpa"):
        sdpa = expert(video).x
    # one call per block and run; space window: (B·T, heads, 1 + N, head_dim)
    assert calls == [torch.Size([3, 4, 5, 16])] * 4
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)
    # the steps used by the fusion graph compose to the block
    tokens = expert.embed(video)
    with torch.no_grad():
        block = expert.layers[0]
        torch.testing.assert_close(block.feed_forward(block.attend(tokens.x, tokens.layout)),
                                   block(tokens.x, tokens.layout))


def test_layer_scale_and_avg_pool_match_open_clip(tmp_path):
    visual, expert = reference_and_expert(tmp_path, vision_cfg=vision(ls_init_value=0.5, pool_type="avg"),
                                          project=True)
    assert expert.pool_mode == "avg" and expert.final_norm is expert.ln_post
    assert not isinstance(expert.blocks[0].ls1, torch.nn.Identity)
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(expert.forward_features(image), visual(image), atol=1e-5, rtol=1e-5)


def test_project_false_drops_proj_and_frozen_by_default(tmp_path):
    _, expert = reference_and_expert(tmp_path)
    assert expert.proj is None and expert.output_dim == 64
    assert not any(k == "proj" or k.endswith(".proj") and "attn" not in k for k in expert.state_dict())
    assert "proj" not in dict(expert.named_parameters())
    assert not any(p.requires_grad for p in expert.parameters())
    assert expert.modality == "video" and isinstance(expert.final_norm, torch.nn.Identity)
    assert expert.pool_norm is expert.ln_post
    trainable = ClipViT("ViT-B-16", vision_cfg=vision(), text_cfg=TEXT, embed_dim=24, frozen=False, project=True)
    assert "proj" in trainable.state_dict()
    assert all(p.requires_grad for p in trainable.parameters())


def official_clip_count() -> int:
    total = 0
    with open(REFERENCE) as f:
        next(f)
        for line in f:
            key, shape = line.split("\t")[:2]
            parts = key.split(".")
            own = parts[0].startswith("clip_") or (parts[0] == "blocks" and parts[2].startswith("clip_"))
            if own:
                n = 1
                for s in shape.split("x"):
                    n *= int(s)
                total += n
    return total


def test_vit_b16_parameter_count_equals_official_cast_spatial_expert():
    expert = ClipViT("ViT-B-16")
    count = sum(p.numel() for p in expert.parameters())
    assert count == official_clip_count() == 85_799_424
    assert expert.image_size == (224, 224) and expert.dims == [768] * 12
    assert count + 768 * 512 == sum(p.numel() for p in ClipViT("ViT-B-16", project=True).parameters())


def test_hub_tag_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def never(*args, **kwargs):
        raise AssertionError("the model must not be built before the offline check")

    monkeypatch.setattr(open_clip, "create_model", never)
    with pytest.raises(PretrainedError, match="'openai'.*HF_HUB_OFFLINE.*local weight file"):
        ClipViT("ViT-B-16", pretrained="openai")
    with pytest.raises(PretrainedError, match="neither a local file nor an open_clip tag.*openai"):
        ClipViT("ViT-B-16", pretrained="no_such_tag")
    with pytest.raises(PretrainedError, match="does not exist"):
        ClipViT("ViT-B-16", pretrained="/nonexistent/clip.pt")


def test_bad_checkpoint_wrapped(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(PretrainedError, match="cannot load pretrained file"):
        ClipViT("ViT-B-16", pretrained=str(path), vision_cfg=vision(), text_cfg=TEXT, embed_dim=24)


@pytest.mark.parametrize(("override", "feature"), [
    (dict(patch_dropout=0.5), "patch dropout"),
    (dict(attentional_pool=True, attn_pooler_heads=1, attn_pooler_queries=2), "attentional pooler"),
    (dict(qk_norm=True), "qk_norm"),
])
def test_unsupported_variants_named(override, feature):
    with pytest.raises(ValueError, match=feature):
        ClipViT("ViT-B-16", vision_cfg=vision(**override), text_cfg=TEXT, embed_dim=24)


def test_image_size_override_and_mismatch_error():
    expert = ClipViT("ViT-B-16", vision_cfg=vision(), text_cfg=TEXT, embed_dim=24, img_size=48)
    assert expert.positional_embedding.shape == (1 + 9, 64) and expert.image_size == (48, 48)
    assert expert(torch.randn(1, 3, 2, 48, 48)).layout == TokenLayout(2, 3, 3, 1, True)
    with pytest.raises(ValueError, match=r"\(32, 32\) give a 2x2 patch grid.*\(48, 48\)"):
        expert(torch.randn(1, 3, 2, 32, 32))


def test_registered():
    assert EXPERTS.get("clip_vit") is ClipViT
    entry = next(e for e in EXPERTS.entries() if e.name == "clip_vit")
    assert "CLIP" in entry.description

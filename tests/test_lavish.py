"""LAVISH: adapter maths against an independent reference, the layer equations (paper eq. 4-5) in a
tiny shared-backbone graph, identity at init, the ablation variants, the shared backbone, counts.

The references never call the operator's code paths (windowed, LatentAdapter methods): they read
the adapter's parameters and recompute softmax attentions, grouped 1x1 convolutions (as
block-diagonal matrices) and eval-mode batch norms with plain tensor algebra, per 1-s segment.
"""

from __future__ import annotations

import pytest
import torch

import fusionkit
import fusionkit.experts.swin  # noqa: F401 - registers timm_swin
from fusionkit.attention import use_backend
from fusionkit.fusion.lavish import LAVISH, LatentAdapter
from fusionkit.heads import total_loss

T, IMG, DIM = 2, 32, 32


def tiny_recipe() -> dict:
    """A tiny ViT (2 layers, 32 wide, 2x2 patches per frame + CLS) shared by video and audio."""
    return {
        "inputs": {"video": [3, T, IMG, IMG], "audio": [8000]},
        "experts": {
            "video": {"type": "timm_vit", "name": "vit_tiny_patch16_224", "img_size": IMG, "depth": 2,
                      "embed_dim": DIM, "num_heads": 2, "pool": "avg"},
            "audio": {"type": "shared", "expert": "video", "modality": "audio",
                      "frontend": {"type": "spectrogram_image", "chunks": T, "num_mel_bins": 16, "frames": 24,
                                   "size": [IMG, IMG], "mean": -4.1426, "std": 3.2001}},
        },
        "fusion": {"lavish": {"type": "lavish", "experts": ["video", "audio"], "latents": 2, "reduction": 4}},
        "heads": {"event": {"type": "mlp", "experts": ["video", "audio"], "classes": 5, "hidden": 16, "act": "none"}},
    }


def batch(size: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"video": torch.randn(size, 3, T, IMG, IMG, generator=g), "audio": 0.1 * torch.randn(size, 8000, generator=g)}


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero gates, random affine norms and batch-norm statistics (nothing is zero any more)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gate"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


# reference ------------------------------------------------------------------------------------

def grouped(conv: torch.nn.Conv1d) -> torch.Tensor:
    """A grouped 1x1 convolution as its dense (out, in) block-diagonal matrix."""
    w = conv.weight[:, :, 0]
    out_g, in_g = w.shape[0] // conv.groups, w.shape[1]
    dense = torch.zeros(w.shape[0], in_g * conv.groups, dtype=w.dtype)
    for i in range(conv.groups):
        dense[i * out_g:(i + 1) * out_g, i * in_g:(i + 1) * in_g] = w[i * out_g:(i + 1) * out_g]
    return dense


def layer_norm(x, norm):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def batch_norm_eval(x, bn):
    return (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def reference_lav(ad: LatentAdapter, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LAV(S -> T) for ONE window: source (S_s, C), target (S_t, C); batch norms in eval mode."""
    if ad.latents is not None:
        lat = ad.latents
        g_tk = 1.0 if ad.latent_gate is None else ad.latent_gate   # official gate_tk
        lat = lat + g_tk * (torch.softmax(lat @ source.T, dim=-1) @ source)
        x = target + ad.fusion_gate * (torch.softmax(target @ lat.T, dim=-1) @ lat)
    else:
        x = target + ad.fusion_gate * (torch.softmax(target @ source.T, dim=-1) @ source)
    h = layer_norm(x, ad.norm_before) @ grouped(ad.down).T
    h = torch.relu(batch_norm_eval(h, ad.down_norm)) @ grouped(ad.up).T
    return ad.gate * layer_norm(batch_norm_eval(h, ad.up_norm), ad.norm_after)


def per_frame(ad, source, target, frames):
    """Reference over a (B, L, C) clip whose frames are contiguous equal runs (per-frame CLS)."""
    b, length, c = target.shape
    s, t = source.reshape(b, frames, -1, c), target.reshape(b, frames, -1, c)
    out = [[reference_lav(ad, s[i, f], t[i, f]) for f in range(frames)] for i in range(b)]
    return torch.stack([torch.cat(o) for o in out])


# tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("latents, latent_gate", [(2, False), (2, True), (0, False)])
def test_adapter_matches_reference(latents: int, latent_gate: bool) -> None:
    torch.manual_seed(0)
    ad = LatentAdapter(16, latents=latents, reduction=4, latent_gate=latent_gate).double()
    randomise(ad)  # latent_gate too: 0.5 + U[0, 1), not 1
    ad.eval()
    src, tgt = torch.randn(3, 7, 16, dtype=torch.float64), torch.randn(3, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        ours = ad(src, tgt)
        ref = torch.stack([reference_lav(ad, src[i], tgt[i]) for i in range(3)])
    torch.testing.assert_close(ours, ref)
    assert ad.down.weight.shape == (4, 8, 1) and ad.down.bias is None and ad.down.groups == 2


def test_adapter_is_zero_at_init_and_batch_norm_spans_all_tokens() -> None:
    torch.manual_seed(0)
    ad = LatentAdapter(16, latents=2, reduction=4)
    assert ad.gate.item() == 0 and ad.fusion_gate.item() == 0 and bool((ad.latents >= 0).all())
    assert LatentAdapter(16, latent_init="zeros").latents.abs().sum() == 0
    assert ad.latent_gate is None                                         # ungated unless asked
    assert LatentAdapter(16, latent_gate=True).latent_gate.item() == 1    # official gate_tk: ones(1)
    assert LatentAdapter(16, latents=0, latent_gate=True).latent_gate is None  # AVISH: nothing to gate
    src, tgt = torch.randn(3, 7, 16), torch.randn(3, 5, 16)
    assert ad(src, tgt).abs().max() == 0
    with torch.no_grad():
        ad.gate.fill_(1.0)
    ad.train()
    h = ad.up_norm(ad.up(ad.act(ad.down_norm(ad.down(ad.norm_before(tgt).transpose(1, 2))))))
    assert torch.allclose(h.mean(dim=(0, 2)), torch.zeros(16), atol=1e-5)  # training BN over all B·L tokens


def test_layer_equations_in_the_graph() -> None:
    """X' = Y + MLP(Y) + LAV(Y_s -> Y_t) with Y = X + MHA(X) + LAV(X_s -> X_t), per segment, both streams."""
    torch.manual_seed(0)
    model = fusionkit.build(tiny_recipe()).double()
    randomise(model.fusions)
    model.eval()
    b = {k: v.double() for k, v in batch().items()}
    with torch.no_grad(), use_backend("eager"):
        ours = model.forward_tokens(b)
        video, audio = model.experts["video"], model.experts["audio"]
        x = {"video": video.embed(b["video"]).x, "audio": audio.embed(b["audio"]).x}
        for step, block in enumerate(video.layers):
            op = model.fusions["lavish"][str(step)]
            layout = video.embed(b["video"]).layout
            y = {e: block.attend(x[e], layout) for e in x}
            y["video"] = y["video"] + per_frame(op.attn_adapters["audio_to_video"], x["audio"], x["video"], T)
            y["audio"] = y["audio"] + per_frame(op.attn_adapters["video_to_audio"], x["video"], x["audio"], T)
            x = {e: block.feed_forward(y[e]) for e in y}
            x["video"] = x["video"] + per_frame(op.mlp_adapters["audio_to_video"], y["audio"], y["video"], T)
            x["audio"] = x["audio"] + per_frame(op.mlp_adapters["video_to_audio"], y["video"], y["audio"], T)
    for e in x:
        torch.testing.assert_close(ours[e].x, video.final_norm(x[e]))
        assert (ours[e].x - video(b["video"] if e == "video" else audio.frontend(b["audio"])).x).abs().max() > 1e-3


def test_identity_at_init() -> None:
    torch.manual_seed(0)
    model = fusionkit.build(tiny_recipe())
    for mode in (model.eval, model.train):
        mode()
        with torch.no_grad():
            fused = model.forward_tokens(batch())
            alone = {e: ex(batch()[ex.modality]) for e, ex in model.experts.items()}
        for e in alone:
            torch.testing.assert_close(fused[e].x, alone[e].x, atol=0, rtol=0)


def forward_backward(model) -> set[str]:
    model.train()
    logits = model(batch())
    loss, _ = total_loss(model.heads, logits, {"event": torch.tensor([1, 3])})
    loss.backward()
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    reached = {k for k, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == trainable, (sorted(trainable - reached)[:5], sorted(reached - trainable)[:5])
    return trainable


@pytest.mark.parametrize("override, adapters, latents", [
    ("fusion.lavish.latents=2", {"audio_to_video", "video_to_audio"}, 2),
    ("fusion.lavish.avish=true", {"audio_to_video", "video_to_audio"}, None),
    ("fusion.lavish.latents=0", {"audio_to_video", "video_to_audio"}, None),
    ("fusion.lavish.latents=4", {"audio_to_video", "video_to_audio"}, 4),
    ("fusion.lavish.latent_gate=true", {"audio_to_video", "video_to_audio"}, 2),
    ("fusion.lavish.directions=[audio->video]", {"audio_to_video"}, 2),
    ("fusion.lavish.directions=[video->audio]", {"video_to_audio"}, 2),
    ("fusion.lavish.directions=[audio->video,audio->audio]", {"audio_to_video", "audio_to_audio"}, 2),
])
def test_variants_build_by_one_override_and_train(override: str, adapters: set[str], latents) -> None:
    torch.manual_seed(0)
    model = fusionkit.build(tiny_recipe(), [override])
    op = model.fusions["lavish"]["1"]
    assert set(op.attn_adapters) == adapters and set(op.mlp_adapters) == adapters
    for ad in [*op.attn_adapters.values(), *op.mlp_adapters.values()]:
        assert (ad.latents is None) if latents is None else ad.latents.shape == (latents, DIM)
    randomise(model.fusions)
    trainable = forward_backward(model)
    assert all(k.startswith(("fusions.", "heads.")) for k in trainable)
    per_adapter = sum(p.numel() for p in op.attn_adapters[sorted(adapters)[0]].parameters())
    assert sum(p.numel() for p in model.fusions.parameters()) == 2 * 2 * len(adapters) * per_adapter


def test_unknown_direction_and_unequal_widths_fail() -> None:
    with pytest.raises(fusionkit.recipes.RecipeError, match="query 'sound' is not one of the joined experts"):
        fusionkit.build(tiny_recipe(), ["fusion.lavish.directions=[audio->sound]"])
    with pytest.raises(ValueError, match="equal widths"):
        from fusionkit.attention import TokenLayout
        lay = TokenLayout(1, 2, 2)
        LAVISH(experts=["a", "b"], dims={"a": 32, "b": 64}, layouts={"a": lay, "b": lay})


def test_shared_backbone_is_one_set_of_weights() -> None:
    torch.manual_seed(0)
    model = fusionkit.build(tiny_recipe())
    video, audio = model.experts["video"], model.experts["audio"]
    assert audio.layers[0] is video.layers[0]
    assert sum(p.numel() for p in model.experts.parameters()) == sum(p.numel() for p in video.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert total == sum(p.numel() for p in video.parameters()) + sum(
        p.numel() for p in model.fusions.parameters()) + sum(p.numel() for p in model.heads.parameters())
    assert not any(k.startswith("experts.audio.") for k in model.state_dict())
    model.eval()
    with torch.no_grad():
        before = model.forward_tokens(batch())
        video.layers[1].mlp.fc2.weight.mul_(1.5)
        after = model.forward_tokens(batch())
    for e in ("video", "audio"):
        assert (before[e].x - after[e].x).abs().max() > 1e-3


def test_swin_adapters_are_sized_per_stage() -> None:
    """A tiny Swin shared by audio and video: LAVISH in the blocks only, each adapter at its stage's width."""
    swin = {"type": "timm_swin", "name": "swinv2_tiny_window8_256", "img_size": 32, "window_size": 4,
            "embed_dim": 16, "depths": [2, 2], "num_heads": [2, 2]}
    recipe = tiny_recipe()
    recipe["experts"]["video"] = swin
    recipe["fusion"]["lavish"]["layers"] = [0, 1, 3, 4]  # layer 2 is the patch merging
    torch.manual_seed(0)
    model = fusionkit.build(recipe)
    widths = {s: op.attn_adapters["audio_to_video"].norm_before.weight.shape[0]
              for s, op in model.fusions["lavish"].items()}
    assert widths == {"0": 16, "1": 16, "3": 32, "4": 32}
    assert model.fusions["lavish"]["3"].mlp_adapters["video_to_audio"].down.weight.shape == (8, 16, 1)  # 32 / r=4, groups 2
    randomise(model.fusions)
    forward_backward(model)
    bad = fusionkit.build(recipe, ["fusion.lavish.steps=null"])
    with pytest.raises(ValueError, match="patch merging"):
        bad(batch())


@pytest.mark.slow
@pytest.mark.parametrize("recipe, trainable, total, paper", [
    ("lavish_vitb16", 4_645_037, 90_443_693, 4.7e6),
    ("lavish_swinv2_l", 10_036_157, 205_239_089, 10.1e6),
])
def test_recipe_parameter_counts(recipe: str, trainable: int, total: int, paper: float) -> None:
    model = fusionkit.build(recipe)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert sum(p.numel() for p in model.parameters()) == total
    assert abs(trainable - paper) / paper < 0.05
    assert all(k.startswith(("fusions.lavish.", "heads.event.")) for k, p in model.named_parameters()
               if p.requires_grad)

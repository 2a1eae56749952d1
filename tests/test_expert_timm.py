"""timm_vit and timm_cnn experts against timm's own forward with the same weights."""

from __future__ import annotations

import pytest
import timm
import torch

from fusionkit.attention import TokenLayout
from fusionkit.experts import FrameSelect, TimmCNN, TimmViT
from fusionkit.experts.pretrained import PretrainedError


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def timm_layout(expert: TimmViT) -> dict[str, torch.Tensor]:
    """The expert's weights under timm's own names (its final norms live on the expert)."""
    sd = {k.removeprefix("vit."): v for k, v in expert.state_dict().items()}
    return {k.replace("final_norm.", "norm.").replace("pool_norm.", "fc_norm."): v for k, v in sd.items()}


def tiny_vit(**kw) -> TimmViT:
    expert = TimmViT("vit_tiny_patch16_224", img_size=32, depth=2, **kw).eval()
    randomize(expert)
    return expert


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_timm_vit_matches_timm_per_frame(global_pool):
    expert = tiny_vit(frame_select=FrameSelect(stride=2, offset=1), global_pool=global_pool)
    ref = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=0, global_pool=global_pool).eval()
    ref.load_state_dict(timm_layout(expert))
    video = torch.randn(2, 3, 6, 32, 32)
    tokens = expert(video)
    assert tokens.layout == TokenLayout(3, 2, 2, extras=1, per_frame_extras=True)
    per_frame = tokens.x.reshape(2, 3, 5, -1)
    for k, frame in enumerate((1, 3, 5)):
        want = ref.forward_features(video[:, :, frame])
        torch.testing.assert_close(per_frame[:, k], want, atol=1e-5, rtol=1e-5)
    single = expert.pool(expert(video[:, :, 1]))
    torch.testing.assert_close(single, ref.forward_head(ref.forward_features(video[:, :, 1]), pre_logits=True),
                               atol=1e-5, rtol=1e-5)


def test_timm_vit_frozen_by_default_and_unfrozen_on_request():
    assert not any(p.requires_grad for p in tiny_vit().parameters())
    assert all(p.requires_grad for p in tiny_vit(frozen=False).parameters())


def test_frame_select_errors_name_shapes():
    with pytest.raises(ValueError, match=r"needs 8 frames .* gives 4"):
        FrameSelect(stride=2, num=8)(torch.zeros(1, 3, 8, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        FrameSelect()(torch.zeros(3, 8, 4, 4))


def test_timm_pretrained_offline_hub_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedError, match="HF_HUB_OFFLINE.*local weight file"):
        TimmViT("vit_tiny_patch16_224", pretrained=True)


def test_timm_vit_pretrained_local_file(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=0)
    randomize(ref, seed=3)
    path = tmp_path / "vit.pth"
    torch.save(ref.state_dict(), path)
    expert = TimmViT("vit_tiny_patch16_224", pretrained=str(path), img_size=32, depth=2)
    ours = timm_layout(expert)
    assert set(ours) == set(ref.state_dict())
    for name, q in ref.state_dict().items():
        assert torch.equal(ours[name], q), name


def test_timm_cnn_stages_match_timm_features():
    expert = TimmCNN("resnet18", frame_select=FrameSelect(stride=2)).eval()
    randomize(expert)
    ref = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    rename = {"stem.0": "conv1", "stem.1": "bn1", **{f"layers.{i}.body": f"layer{i + 1}" for i in range(4)}}
    ours = {}
    for key, value in expert.state_dict().items():
        prefix = next(p for p in rename if key.startswith(p + "."))
        ours[rename[prefix] + key[len(prefix):]] = value
    ref.load_state_dict(ours)
    video = torch.randn(2, 3, 4, 64, 64)
    tokens = expert.embed(video)
    feats = ref(video[:, :, 0::2].permute(0, 2, 1, 3, 4).reshape(4, 3, 64, 64))
    assert expert.dims == [64, 128, 256, 512]
    for i, want in enumerate(feats):
        tokens = expert.run_layer(i, tokens)
        assert tokens.layout == TokenLayout(2, want.shape[2], want.shape[3])
        got = tokens.x.reshape(2, 2, want.shape[2], want.shape[3], -1).permute(0, 1, 4, 2, 3).reshape(want.shape)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_frozen_cnn_keeps_batchnorm_statistics_in_training():
    expert = TimmCNN("resnet18").train()
    before = expert.stem[1].running_mean.clone()
    expert(torch.randn(2, 3, 2, 32, 32))
    assert torch.equal(before, expert.stem[1].running_mean)
    assert not expert.stem[1].training

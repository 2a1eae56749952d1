"""videomae_vit: parity with transformers' VideoMAEModel, checkpoint layouts, errors, size presets."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fusionkit.experts.videomae  # noqa: F401 - registers the expert
from fusionkit.experts.pretrained import PretrainedError
from fusionkit.experts.videomae import VideoMAEViT, convert_videomae_state_dict, sinusoid_table
from fusionkit.registry import EXPERTS

TINY = dict(embed_dim=64, depth=2, num_heads=4, img_size=32, num_frames=4, patch_size=8)
REFERENCE = Path(__file__).resolve().parent / "data" / "cast_official" / "cast_official_ek100_composition.tsv"


def tiny(**kwargs) -> VideoMAEViT:
    return VideoMAEViT(**{**TINY, **kwargs}).eval()


def randomize(module: nn.Module, seed: int = 0) -> None:
    """Every parameter to non-trivial random values (biases, q/v biases and norms included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + offset)


def video(batch: int = 2, frames: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(1))


def hf_model(use_mean_pooling: bool, classification: bool = False) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.VideoMAEConfig(
        image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=256, hidden_act="gelu", layer_norm_eps=1e-6, qv_bias=True,
        use_mean_pooling=use_mean_pooling, num_labels=3, attn_implementation="eager")
    cls = transformers.VideoMAEForVideoClassification if classification else transformers.VideoMAEModel
    model = cls(config).eval()
    randomize(model)
    return model


def to_official(sd: dict[str, torch.Tensor], pretrain: bool) -> dict[str, torch.Tensor]:
    """fusionkit keys to the official VideoMAE layout (pre-training: ``encoder.`` plus a decoder)."""
    out = {}
    for key, value in sd.items():
        key = re.sub(r"^final_norm\.", "norm.", key)
        key = re.sub(r"^pool_norm\.", "fc_norm.", key)
        key = re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", key)
        out[("encoder." if pretrain else "") + key] = value.clone()
    if pretrain:
        out.update({"decoder.blocks.0.attn.qkv.weight": torch.zeros(6, 2), "decoder.norm.weight": torch.ones(2),
                    "encoder_to_decoder.weight": torch.zeros(2, 64), "mask_token": torch.zeros(1, 1, 2)})
    else:
        out.update({"head.weight": torch.zeros(3, 64), "head.bias": torch.zeros(3)})
    return out


def test_registered_and_frozen() -> None:
    assert EXPERTS.get("videomae_vit") is VideoMAEViT
    model = EXPERTS.build("videomae_vit", **TINY)
    assert model.modality == "video" and model.depth == 2 and model.dims == [64, 64]
    assert not any(p.requires_grad for p in model.parameters())
    assert any(p.requires_grad for p in tiny(frozen=False).parameters())


def test_tokens_layout_and_pooling() -> None:
    model = tiny()
    tokens = model.embed(video())
    assert tokens.x.shape == (2, 2 * 16, 64)
    assert (tokens.layout.t, tokens.layout.h, tokens.layout.w, tokens.layout.extras) == (2, 4, 4, 0)
    out = model(video())
    assert isinstance(model.final_norm, nn.Identity) and isinstance(model.pool_norm, nn.LayerNorm)
    torch.testing.assert_close(model.pool(out), model.pool_norm(out.x.mean(dim=1)))


def test_time_major_tokens() -> None:
    """Token ``t·N + n`` comes from tubelet ``t`` only: changing frames 2-3 leaves the first N tokens."""
    model = tiny()
    clip = video(batch=1)
    other = clip.clone()
    other[:, :, 2:] += 1.0
    a, b = model.embed(clip).x, model.embed(other).x
    torch.testing.assert_close(a[:, :16], b[:, :16])
    assert not torch.allclose(a[:, 16:], b[:, 16:])


def test_position_table_formula_and_not_in_state_dict() -> None:
    model = tiny()
    assert not any("pos" in k for k in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in model.state_dict().values())
    table = sinusoid_table(7, 6)
    angle = torch.tensor(5 / 10000 ** (2 / 6), dtype=torch.float64)  # position 5, dims 2 (sin) and 3 (cos)
    assert table[5, 2].item() == pytest.approx(angle.sin().item())
    assert table[5, 3].item() == pytest.approx(angle.cos().item())
    torch.testing.assert_close(model.pos_table, sinusoid_table(32, 64))
    # longer clips than built for get the table computed for their token count
    x = torch.zeros(1, 3, 6, 32, 32)
    with torch.no_grad():
        tokens = model.embed(x).x - model.patch_embed(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens[0], sinusoid_table(48, 64))


@pytest.mark.parametrize("shape", [(2, 3, 5, 32, 32), (2, 3, 4, 30, 32), (2, 1, 4, 32, 32), (3, 4, 32, 32)])
def test_bad_input_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=re.escape(f"got {shape}")) as err:
        tiny().embed(torch.zeros(shape))
    assert "(B, 3, T, H, W)" in str(err.value)


@pytest.mark.parametrize("old_qv_names", [False, True])
def test_parity_with_transformers_layernorm(old_qv_names: bool) -> None:
    hf = hf_model(use_mean_pooling=False)
    sd = {f"videomae.{k}": v for k, v in hf.state_dict().items()}
    if old_qv_names:  # transformers < 5 stored q_bias / v_bias beside query / value without bias
        sd = {re.sub(r"query\.bias$", "q_bias", re.sub(r"value\.bias$", "v_bias", k)): v for k, v in sd.items()}
    model = tiny(use_mean_pooling=False)
    model.load_state_dict(convert_videomae_state_dict(sd))
    clip = video()
    with torch.no_grad():
        expected = hf(pixel_values=clip.transpose(1, 2)).last_hidden_state
        out = model(clip)
    assert model.blocks[0].attn.q_bias.abs().min() > 0 and model.blocks[0].attn.v_bias.abs().min() > 0
    torch.testing.assert_close(out.x, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.pool(out), expected.mean(dim=1), atol=1e-5, rtol=1e-5)


def test_parity_with_transformers_mean_pooling(tmp_path: Path) -> None:
    hf = hf_model(use_mean_pooling=True, classification=True)
    hf.fc_norm.eps = 1e-6  # transformers builds fc_norm with the default eps; VideoMAE uses 1e-6
    path = tmp_path / "hf.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    model = tiny(pretrained=str(path))
    clip = video()
    with torch.no_grad():
        hf_tokens = hf.videomae(pixel_values=clip.transpose(1, 2)).last_hidden_state
        pooled = hf.fc_norm(hf_tokens.mean(dim=1))
        out = model(clip)
    torch.testing.assert_close(out.x, hf_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.pool(out), pooled, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("pretrain", [True, False])
def test_official_layout_round_trip(pretrain: bool, tmp_path: Path) -> None:
    source = tiny(use_mean_pooling=False, init_values=0.1)
    randomize(source)
    ours = source.state_dict()
    back = convert_videomae_state_dict(to_official(ours, pretrain))
    assert set(back) == set(ours)
    for key, value in ours.items():
        assert torch.equal(back[key], value), key
    path = tmp_path / "videomae.pth"
    torch.save({"model": to_official(ours, pretrain)}, path)
    loaded = tiny(use_mean_pooling=False, init_values=0.1, pretrained=str(path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(video()).x, source(video()).x)


def test_pretraining_checkpoint_into_mean_pooling(tmp_path: Path) -> None:
    """A pre-training checkpoint has ``norm`` but no ``fc_norm``: norm dropped, fc_norm keeps its init."""
    source = tiny(use_mean_pooling=False)
    randomize(source)
    path = tmp_path / "pretrain.pth"
    torch.save({"model": to_official(source.state_dict(), pretrain=True)}, path)
    model = tiny(pretrained=str(path))
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert torch.equal(model.pool_norm.weight, torch.ones(64)) and torch.equal(model.pool_norm.bias, torch.zeros(64))
    # the other way round fails: a model with a final norm needs the checkpoint's norm
    sd = to_official(tiny().state_dict(), pretrain=False)
    torch.save(sd, tmp_path / "finetuned.pth")
    with pytest.raises(PretrainedError, match=r"missing keys.*final_norm\.weight"):
        tiny(use_mean_pooling=False, pretrained=str(tmp_path / "finetuned.pth"))


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    sd = to_official(tiny().state_dict(), pretrain=False)
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.0.attn.k_bias"] = torch.zeros(64)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(PretrainedError) as err:
        tiny(pretrained=str(path))
    message = str(err.value)
    assert "missing keys (1): blocks.1.mlp.fc2.bias" in message
    assert "unexpected keys (1): blocks.0.attn.k_bias" in message
    assert "broken.safetensors" in message


def test_shape_mismatch_and_foreign_layout(tmp_path: Path) -> None:
    sd = tiny().state_dict()
    save_file(sd, str(tmp_path / "patch8.safetensors"))
    with pytest.raises(PretrainedError, match=re.escape("patch_embed.proj.weight: expected (64, 3, 2, 16, 16), got "
                                                        "(64, 3, 2, 8, 8)")):
        tiny(patch_size=16, pretrained=str(tmp_path / "patch8.safetensors"))
    with pytest.raises(PretrainedError, match="not a VideoMAE state dict.*visual.proj"):
        convert_videomae_state_dict({"visual.proj": torch.zeros(2)})
    hf_partial = {"videomae.encoder.layer.0.attention.attention.query.weight": sd["blocks.0.attn.qkv.weight"][:64]}
    # a layer without key/value weights keeps its names so that the strict load lists them
    assert set(convert_videomae_state_dict(hf_partial)) == {"encoder.layer.0.attention.attention.query.weight"}


def test_hub_name_offline_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(PretrainedError, match=r"'MCG-NJU/videomae-base' is a hub name but HF_HUB_OFFLINE"):
        VideoMAEViT(size="L", pretrained="MCG-NJU/videomae-base")
    assert time.perf_counter() - start < 0.5  # before building the (large) model
    with pytest.raises(PretrainedError, match="does not exist"):
        tiny(pretrained="/nonexistent/videomae.pth")


def test_size_presets_and_overrides() -> None:
    with torch.device("meta"):
        small = VideoMAEViT(size="S", depth=1)
        large = VideoMAEViT(size="L", depth=1)
    assert (small.dim, small.blocks[0].attn.num_heads) == (384, 6)
    assert (large.dim, large.blocks[0].attn.num_heads, large.blocks[0].mlp.fc1.out_features) == (1024, 16, 4096)
    with pytest.raises(ValueError, match="unknown VideoMAE size 'XL'"):
        VideoMAEViT(size="XL")
    model = tiny(init_values=0.5, drop_path=0.2)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 5 and all(m.eps == 1e-6 for m in norms)
    assert torch.equal(model.blocks[0].ls1.gamma, torch.full((64,), 0.5))
    assert isinstance(model.blocks[0].drop_path1, nn.Identity)
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.2)


def test_vit_b_parameter_count_matches_official_cast() -> None:
    """ViT-B (224², 16 frames, mean pooling) has exactly the parameters of the official CAST
    temporal expert: patch_embed, blocks' norm1/attn/norm2/mlp and vmae_fc_norm."""
    pattern = re.compile(r"(patch_embed\.|blocks\.\d+\.(norm1|attn|norm2|mlp)\.|vmae_fc_norm\.)")
    official = 0
    for line in REFERENCE.read_text().splitlines()[1:]:
        key, shape, _ = line.split("\t")
        if pattern.match(key):
            official += torch.Size(int(s) for s in shape.split("x")).numel()
    with torch.device("meta"):
        model = VideoMAEViT(size="B")
    assert official == 86_227_200
    assert sum(p.numel() for p in model.parameters()) == official
    assert model.pos_table.shape == (8 * 196, 768)

"""ast expert: parity with HF transformers' ASTModel, weight layouts, strict loading, positions."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file
from transformers import ASTConfig, ASTForAudioClassification, ASTModel

import fusionkit.experts.ast  # noqa: F401 - registers "ast"
from fusionkit.attention import TokenLayout
from fusionkit.experts.ast import AST, ast_layout, convert_ast_state_dict
from fusionkit.experts.pretrained import is_local_file
from fusionkit.experts.pretrained import PretrainedError, load_into
from fusionkit.registry import EXPERTS

TINY = dict(embed_dim=64, depth=2, num_heads=4, num_mel_bins=32, max_length=64)
HF_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, num_mel_bins=32,
               max_length=64, attn_implementation="eager")
GRID = (2, 5)  # (32 - 16) // 10 + 1 frequency rows, (64 - 16) // 10 + 1 time columns


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random and far from its init (norm weights around 1, biases nonzero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            centre = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            p.copy_(centre + 0.2 * torch.randn(p.shape, generator=g))


def tiny_ast(**kw) -> AST:
    expert = AST(**{**TINY, **kw}).eval()
    randomize(expert)
    return expert


def official_layout(expert: AST) -> dict[str, torch.Tensor]:
    """The expert's weights as the official YuanGongND/ast checkpoints store them (with heads)."""
    sd = {f"module.v.{k}": v.clone() for k, v in expert.state_dict().items()}
    d = expert.dim
    sd.update({"module.v.head.weight": torch.randn(5, d), "module.v.head.bias": torch.randn(5),
               "module.v.head_dist.weight": torch.randn(5, d), "module.v.head_dist.bias": torch.randn(5),
               "module.mlp_head.0.weight": torch.randn(d), "module.mlp_head.0.bias": torch.randn(d),
               "module.mlp_head.1.weight": torch.randn(5, d), "module.mlp_head.1.bias": torch.randn(5)})
    return sd


def features(batch: int = 2, frames: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, frames, 32, generator=torch.Generator().manual_seed(seed))


def test_registered_with_description():
    assert EXPERTS.get("ast") is AST
    entry = next(e for e in EXPERTS.entries() if e.name == "ast")
    assert "AST" in entry.description


@torch.no_grad()
def test_parity_with_hf_ast_model():
    hf = ASTModel(ASTConfig(**HF_TINY)).eval()
    randomize(hf, seed=3)
    expert = AST(**TINY).eval()
    assert ast_layout(hf.state_dict()) == "hf"
    load_into(expert, convert_ast_state_dict(hf.state_dict()), "hf")
    x = features()
    ref = hf(input_values=x)
    tokens = expert(x)
    assert tokens.layout == TokenLayout(1, *GRID, extras=2, per_frame_extras=False)
    assert ref.last_hidden_state.abs().max() > 1.0  # non-trivial activations
    torch.testing.assert_close(tokens.x, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(expert.pool(tokens), ref.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(expert.forward_features(x), ref.pooler_output, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_loads_hf_hub_layout_file(tmp_path):
    """save_pretrained writes the hub names (encoder.layer.N.attention.attention.query, ...)."""
    hf = ASTForAudioClassification(ASTConfig(**HF_TINY, num_labels=3)).eval()
    randomize(hf, seed=4)
    hf.save_pretrained(tmp_path)
    expert = AST(pretrained=str(tmp_path / "model.safetensors"), **TINY).eval()
    x = features(seed=5)
    ref = hf.audio_spectrogram_transformer(input_values=x)
    torch.testing.assert_close(expert(x).x, ref.last_hidden_state, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_official_layout_round_trip(tmp_path):
    src = tiny_ast()
    sd = official_layout(src)
    assert ast_layout(sd) == "official"
    path = tmp_path / "audioset_10_10_0.4593.pth"
    torch.save(sd, path)
    dst = AST(pretrained=str(path), **TINY).eval()
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, atol=0, rtol=0)
    x = features()
    torch.testing.assert_close(dst(x).x, src(x).x, atol=0, rtol=0)
    assert all(not p.requires_grad for p in dst.parameters())
    # fusionkit's own layout loads as it is
    own = tmp_path / "own.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(own))
    assert ast_layout(src.state_dict()) == "fusionkit"
    torch.testing.assert_close(AST(pretrained=str(own), **TINY).eval()(x).x, src(x).x, atol=0, rtol=0)


def test_strict_load_names_bad_key(tmp_path):
    sd = official_layout(tiny_ast())
    sd["module.v.blocks.1.attn.bogus_scale"] = torch.ones(3)
    sd["module.v.blocks.0.mlp.fc1.renamed"] = sd.pop("module.v.blocks.0.mlp.fc1.weight")
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(PretrainedError) as err:
        AST(pretrained=str(path), **TINY)
    msg = str(err.value)
    assert "blocks.1.attn.bogus_scale" in msg and "blocks.0.mlp.fc1.weight" in msg and "bad.pth" in msg


def test_shape_mismatch_is_reported(tmp_path):
    sd = official_layout(tiny_ast(max_length=128))  # longer position table
    path = tmp_path / "long.pth"
    torch.save(sd, path)
    with pytest.raises(PretrainedError, match=r"pos_embed: expected \(1, 12, 64\), got \(1, 26, 64\)"):
        AST(pretrained=str(path), **TINY)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(PretrainedError, match="does not exist"):
        AST(pretrained=str(tmp_path / "nope.pth"), **TINY)


def test_offline_hub_name_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not is_local_file("MIT/ast-finetuned-audioset-10-10-0.4593")
    assert is_local_file("weights/ast.pth") and is_local_file("/abs/dir/ast")
    start = time.perf_counter()
    with pytest.raises(PretrainedError, match="HF_HUB_OFFLINE") as err:
        AST(pretrained="MIT/ast-finetuned-audioset-10-10-0.4593")  # full size: must fail before building
    assert time.perf_counter() - start < 0.5
    assert "MIT/ast-finetuned-audioset-10-10-0.4593" in str(err.value) and "local weight file" in str(err.value)


@torch.no_grad()
def test_position_interpolation_for_shorter_input():
    expert = tiny_ast()
    d = expert.dim
    # a position table that varies only with frequency: resizing the time axis must keep it
    rows = torch.randn(GRID[0], 1, d)
    expert.pos_embed[:, 2:] = rows.expand(GRID[0], GRID[1], d).reshape(1, -1, d)
    x = features(frames=44)  # (44 - 16) // 10 + 1 = 3 time columns
    tokens = expert.embed(x)
    assert tokens.layout == TokenLayout(1, 2, 3, extras=2, per_frame_extras=False)
    assert tokens.x.shape == (2, 2 + 2 * 3, d)
    patches = expert.patch_embed(x.transpose(1, 2)[:, None]).flatten(2).transpose(1, 2)  # f-major
    expected = patches + rows.expand(2, 3, d).reshape(1, 6, d)
    torch.testing.assert_close(tokens.x[:, 2:], expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(tokens.x[:, :2], torch.cat([expert.cls_token, expert.dist_token], 1).expand(2, 2, d)
                               + expert.pos_embed[:, :2], atol=1e-6, rtol=1e-6)
    out = expert(x)
    assert out.x.shape == (2, 8, d) and torch.isfinite(out.x).all()
    assert expert.pool(out).shape == (2, d)
    # a longer input interpolates up; the configured length uses the table as it is
    assert expert(features(frames=96)).layout == TokenLayout(1, 2, 9, extras=2)
    assert expert.position_embedding(GRID) is expert.pos_embed


@torch.no_grad()
def test_waveform_input_runs_frontend():
    expert = tiny_ast()
    wave = 0.1 * torch.randn(2, 2, 8000, generator=torch.Generator().manual_seed(0))  # stereo, 0.5 s
    feats = expert.frontend(wave)
    assert feats.shape == (2, 64, 32)
    torch.testing.assert_close(expert(wave).x, expert(feats).x, atol=0, rtol=0)
    torch.testing.assert_close(expert(wave.mean(1)).x, expert(feats).x, atol=1e-6, rtol=1e-6)
    assert not list(expert.frontend.parameters())
    with pytest.raises(ValueError, match="expects a waveform"):
        expert(torch.randn(2, 1, 64, 32))


def test_final_norm_and_frozen_defaults():
    expert = AST(**TINY)
    assert isinstance(expert.final_norm, torch.nn.LayerNorm) and expert.final_norm.eps == 1e-12
    assert AST(**TINY, norm_eps=1e-6).blocks[0].norm1.eps == 1e-6
    assert not any(k.startswith("norm.") for k in expert.state_dict())
    assert all(not p.requires_grad for p in expert.parameters())
    assert all(p.requires_grad for p in AST(**TINY, frozen=False).parameters())
    assert expert.dims == [64, 64] and expert.depth == 2 and expert.modality == "audio"


def test_vit_base_param_count():
    with torch.device("meta"):
        expert = AST()
    d, f, t = 768, (128 - 16) // 10 + 1, (1024 - 16) // 10 + 1
    assert (f, t) == (12, 101)
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    expected = (d * 16 * 16 + d) + (2 + f * t) * d + 2 * d + 12 * block + 2 * d
    assert expected == 86_187_264
    assert sum(p.numel() for p in expert.parameters()) == expected
    assert expert.pos_embed.shape == (1, 1214, 768)

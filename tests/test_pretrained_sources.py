"""Pretrained sources: Hugging Face save_pretrained folders (one file or shards with their index) load
wherever a weight file does, and clip_vit refuses weights whose QuickGELU / GELU contradicts the recipe."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import open_clip
import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import save_file

import fusionkit
from fusionkit.experts import TimmViT
from fusionkit.experts.clip_vit import ClipViT
from fusionkit.experts.pretrained import PretrainedError, read_state_dict
from fusionkit.experts.quick_gelu import QuickGELU
from fusionkit.recipes import load_recipe

TEXT = dict(context_length=4, vocab_size=16, width=16, heads=1, layers=1)
VISION = dict(width=64, layers=2, head_width=16, image_size=32, patch_size=16)
TINY_VIT = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
# (safetensors?, shard size): one model.safetensors, 2 safetensors shards + index, pytorch_model-*.bin shards + index
LAYOUTS = {"single": (True, "5GB"), "safetensors-shards": (True, None), "bin-shards": (False, None)}


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def save_folder(state_dict: dict[str, torch.Tensor], folder: Path, layout: str) -> Path:
    """``state_dict`` written by huggingface_hub's own ``save_torch_state_dict`` in ``layout``."""
    safe, shard = LAYOUTS[layout]
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    folder.mkdir()
    save_torch_state_dict(state_dict, folder, safe_serialization=safe,
                          max_shard_size=shard or int(total * 0.6))  # 2 shards
    return folder


def tiny_clip(quick_gelu: bool = False) -> torch.nn.Module:
    model = open_clip.create_model("ViT-B-16", vision_cfg=VISION, text_cfg=TEXT, embed_dim=24,
                                   force_quick_gelu=quick_gelu)
    randomize(model)
    return model.eval()


def clip_expert(pretrained: str, **kw) -> ClipViT:
    return ClipViT("ViT-B-16", pretrained=pretrained, vision_cfg=VISION, text_cfg=TEXT, embed_dim=24,
                   project=True, **kw).eval()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_folder_layouts_write_the_expected_files(tmp_path, layout):
    folder = save_folder(tiny_clip().state_dict(), tmp_path / "hf", layout)
    names = sorted(p.name for p in folder.iterdir())
    expected = {"single": ["model.safetensors"],
                "safetensors-shards": ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                       "model.safetensors.index.json"],
                "bin-shards": ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                               "pytorch_model.bin.index.json"]}[layout]
    assert names == expected


@pytest.mark.parametrize("layout", LAYOUTS)
def test_timm_expert_state_dict_round_trips_through_a_folder(tmp_path, layout):
    source = TimmViT(**TINY_VIT).eval()
    randomize(source, seed=1)
    want = source.state_dict()
    loaded = read_state_dict(save_folder(want, tmp_path / "hf", layout))
    assert set(loaded) == set(want)
    for key, value in want.items():
        assert torch.equal(loaded[key], value), key
    fresh = TimmViT(**TINY_VIT).eval()
    fresh.load_state_dict(loaded, strict=True)
    video = torch.randn(1, 3, 2, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(video).x, source(video).x)


def test_recipe_weights_key_reads_a_sharded_folder(tmp_path):
    spec = dict(load_recipe("tiny")["experts"]["spatial"])
    assert spec.pop("type") == "timm_vit"
    spec.pop("adapters")  # weights: loads before the adapters are attached
    source = TimmViT(**spec)
    randomize(source, seed=2)
    folder = save_folder(source.state_dict(), tmp_path / "hf", "safetensors-shards")
    model = fusionkit.build("tiny", [f"experts.spatial.weights={folder}"])
    built = model.experts["spatial"].state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(built[key], value), key


@pytest.mark.parametrize("layout", LAYOUTS)
def test_clip_vit_pretrained_folder_equals_open_clip(tmp_path, layout):
    reference = tiny_clip()
    folder = save_folder(reference.state_dict(), tmp_path / "hf", layout)
    expert = clip_expert(str(folder), quick_gelu=False)
    theirs = reference.visual.state_dict()
    assert torch.equal(expert.conv1.weight, theirs["conv1.weight"])
    assert torch.equal(expert.proj, theirs["proj"])
    for i, block in enumerate(expert.blocks):
        assert torch.equal(block.attn.qkv.weight, theirs[f"transformer.resblocks.{i}.attn.in_proj_weight"])
        assert torch.equal(block.mlp.c_fc.weight, theirs[f"transformer.resblocks.{i}.mlp.c_fc.weight"])
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(expert.forward_features(image), reference.visual(image), atol=1e-5, rtol=1e-5)


def test_missing_shard_is_one_line_naming_folder_and_shard(tmp_path):
    folder = save_folder(tiny_clip().state_dict(), tmp_path / "hf", "safetensors-shards")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(PretrainedError) as err:
        read_state_dict(folder)
    message = str(err.value)
    assert message == (f"weight folder {str(folder)!r}: model.safetensors.index.json lists 2 shards but 1 are "
                       "missing: model-00002-of-00002.safetensors")
    with pytest.raises(PretrainedError, match="1 are missing: model-00002-of-00002.safetensors"):
        clip_expert(str(folder))


def test_empty_folder_is_one_line_naming_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedError) as err:
        read_state_dict(tmp_path / "empty")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"weight folder {str(tmp_path / 'empty')!r} holds no weights")
    assert "model.safetensors.index.json" in message and "pytorch_model.bin" in message


def write_open_clip_config(folder: Path, quick_gelu: bool) -> Path:
    config = folder / "open_clip_config.json"
    model_cfg = dict(embed_dim=24, vision_cfg=VISION, text_cfg=TEXT, quick_gelu=quick_gelu)
    config.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    return config


def test_quick_gelu_config_contradicting_the_recipe_is_refused(tmp_path):
    folder = save_folder(tiny_clip(quick_gelu=True).state_dict(), tmp_path / "hf", "single")
    config = write_open_clip_config(folder, quick_gelu=True)
    with pytest.raises(PretrainedError) as err:
        clip_expert(str(folder), quick_gelu=False)
    assert str(err.value) == (
        f"clip_vit 'ViT-B-16': {str(config)!r} (model_cfg.quick_gelu) says the weights were trained with QuickGELU "
        "(quick_gelu: true) but experts.<name>.quick_gelu asks for GELU (quick_gelu: false); "
        "set experts.<name>.quick_gelu: true")


@pytest.mark.parametrize("quick_gelu", [True, None])
def test_quick_gelu_config_matching_or_unset_loads_exactly(tmp_path, quick_gelu):
    reference = tiny_clip(quick_gelu=True)
    folder = save_folder(reference.state_dict(), tmp_path / "hf", "single")
    write_open_clip_config(folder, quick_gelu=True)
    expert = clip_expert(str(folder), quick_gelu=quick_gelu)
    assert isinstance(expert.blocks[0].mlp.gelu, QuickGELU)  # fusionkit's, open_clip's swapped out
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(expert.forward_features(image), reference.visual(image), atol=1e-5, rtol=1e-5)


def test_config_beside_a_weight_file_is_read(tmp_path):
    path = tmp_path / "open_clip_model.safetensors"
    save_file(tiny_clip().state_dict(), path)
    config = write_open_clip_config(tmp_path, quick_gelu=False)
    with pytest.raises(PretrainedError, match=f"{re.escape(str(config))}.*trained with GELU.*asks for QuickGELU"):
        clip_expert(str(path), quick_gelu=True)


def test_bare_state_dict_warns_once_that_the_activation_is_unverified(tmp_path, caplog):
    path = tmp_path / "clip.pt"
    torch.save(tiny_clip().state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="fusionkit.experts.clip_vit"):
        clip_expert(str(path), quick_gelu=False)
    warnings = [r.getMessage() for r in caplog.records if r.name == "fusionkit.experts.clip_vit"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "does not state its activation" in warnings[0] and "using GELU (experts.<name>.quick_gelu: false)" in \
        warnings[0]


def test_hub_tag_states_its_activation(monkeypatch):
    """A known open_clip tag is checked before anything is built or downloaded (openai: QuickGELU)."""
    monkeypatch.setattr(fusionkit.experts.clip_vit, "require_online", lambda spec, what: None)

    def never(*args, **kwargs):
        raise AssertionError("the mismatch must be refused before open_clip builds or downloads anything")

    monkeypatch.setattr(open_clip, "create_model", never)
    with pytest.raises(PretrainedError, match="open_clip pretrained tag 'openai'.*QuickGELU.*asks for GELU"):
        ClipViT("ViT-B-16", pretrained="openai", quick_gelu=False)
    with pytest.raises(PretrainedError, match="'laion2b_s34b_b88k'.*trained with GELU.*asks for QuickGELU"):
        ClipViT("ViT-B-16", pretrained="laion2b_s34b_b88k", quick_gelu=True)


def test_model_name_contradicting_the_recipe_is_refused():
    with pytest.raises(PretrainedError, match="quick_gelu is false but the model name 'ViT-B-16-quickgelu' uses "
                                              "QuickGELU"):
        ClipViT("ViT-B-16-quickgelu", quick_gelu=False)


def test_model_name_contradicting_a_gelu_config_is_refused(tmp_path):
    folder = save_folder(tiny_clip().state_dict(), tmp_path / "hf", "single")
    write_open_clip_config(folder, quick_gelu=False)
    with pytest.raises(PretrainedError, match="trained with GELU .* but the model name 'ViT-B-16-quickgelu' asks for "
                                              "QuickGELU .*; use the name without -quickgelu$"):
        ClipViT("ViT-B-16-quickgelu", pretrained=str(folder), vision_cfg=VISION, text_cfg=TEXT, embed_dim=24)

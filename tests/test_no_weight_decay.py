"""Weight-decay exclusions of the optimizer: what modules declare in ``no_weight_decay()`` (timm's
convention), 1-D tensors, and the recipe's ``train.no_weight_decay`` patterns. Models are built on the
meta device (``fusionkit describe``'s way): group membership needs no weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fusionkit
from fusionkit.describe import MetaMode
from fusionkit.engine.config import train_config
from fusionkit.engine.optim import build_optimizer, declared_no_weight_decay, param_groups
from fusionkit.recipes import load_recipe

# recipe -> (trainable parameters without decay, trainable parameters with decay), a few of each
CASES = {
    "tiny": ({"fusions.bca.1.cross.t2s.pos_q", "fusions.bca.0.cross.s2t.pos_kv",        # B-CA declares them
              "fusions.bca.0.norm.spatial.weight", "heads.verb.fc.bias"},               # 1-D
             {"fusions.bca.0.down.spatial.weight", "fusions.bca.1.cross.t2s.attn.qkv.weight",
              "heads.noun.fc.weight"}),
    "cast_independent": ({"experts.spatial.positional_embedding", "experts.spatial.class_embedding"},  # clip_vit
                         {"experts.spatial.conv1.weight", "experts.temporal.patch_embed.proj.weight"}),
    "ca2st": ({"fusions.bca.0.time_embed.mlp.0.weight", "fusions.bca.0.time_embed.mlp.2.weight",     # the TIM
               "fusions.bca.0.cross.t2s.pos_q"},
              {"fusions.bca.0.cross.a2s.attn.qkv.weight", "fusions.bca.0.down.audio.weight"}),
    "mmvit_iii_merged": ({"experts.iframe.vit.pos_embed", "experts.iframe.vit.cls_token",             # timm's ViT
                          "experts.iframe.time_embed", "experts.motion.pos_embed", "experts.audio.time_embed"},
                         {"experts.motion.patch_embed.weight", "experts.audio.proj.weight", "heads.action.fc.weight"}),
}


def build_meta(recipe: str, overrides: list[str] | None = None) -> nn.Module:
    with MetaMode(build=True):
        return fusionkit.build(recipe, overrides or [])


def decay_sets(groups: list[dict]) -> tuple[set[str], set[str]]:
    """(names without weight decay, names with it)."""
    return ({n for g in groups if not g["weight_decay"] for n in g["names"]},
            {n for g in groups if g["weight_decay"] for n in g["names"]})


def declared_by_prefix(model: nn.Module) -> set[str]:
    """Every module's ``no_weight_decay()`` names, prefixed by the module's path (timm's reading)."""
    return {f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
            if callable(getattr(module, "no_weight_decay", None)) for name in module.no_weight_decay()}


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_no_decay_is_what_modules_declare_plus_1d_tensors(recipe):
    model = build_meta(recipe)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    no_decay, decay = decay_sets(param_groups(model, 1.0, 0.05, 0.75))
    expected_no, expected = CASES[recipe]
    assert expected_no <= no_decay and expected <= decay
    declared = declared_by_prefix(model)
    assert no_decay == {n for n, p in trainable.items() if p.ndim <= 1 or n in declared}
    assert decay == set(trainable) - no_decay
    assert declared_no_weight_decay(model) == declared & {n for n, _ in model.named_parameters()}


def test_swin_declares_timms_exclusions():
    """Swin-V2's position-bias MLPs and (heads, 1, 1) logit scales never decay, as timm declares them."""
    model = build_meta("lavish_swinv2_l", ["trainable.unfreeze=[experts.video.layers.0.*]"])
    no_decay, decay = decay_sets(param_groups(model, 1.0, 0.05, 1.0))
    block = "experts.video.layers.0.block.attn"
    assert {f"{block}.logit_scale", f"{block}.cpb_mlp.0.weight", f"{block}.cpb_mlp.2.weight"} <= no_decay
    assert {f"{block}.qkv.weight", f"{block}.proj.weight"} <= decay
    assert dict(model.named_parameters())[f"{block}.logit_scale"].ndim == 3


def test_recipe_patterns_add_exclusions():
    recipe = load_recipe("tiny", ["train.no_weight_decay=[heads.*]"])
    model = build_meta(recipe)
    groups = build_optimizer(model, train_config(recipe)).param_groups
    no_decay, decay = decay_sets(groups)
    assert {"heads.noun.fc.weight", "heads.verb.fc.weight", "fusions.bca.1.cross.t2s.pos_q"} <= no_decay
    assert "fusions.bca.0.down.spatial.weight" in decay
    assert train_config({})["no_weight_decay"] == []


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(3, 4))
        self.proj = nn.Linear(4, 4)

    def no_weight_decay(self) -> set[str]:
        return {"table", "missing"}  # a name the module does not hold is ignored, as timm's dist_token


def test_declarations_are_relative_to_the_declaring_module():
    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleDict({"inner": _Inner()}))
    assert declared_no_weight_decay(model) == {"1.inner.table"}
    no_decay, decay = decay_sets(param_groups(model, 1.0, 0.05))
    assert no_decay == {"1.inner.table", "0.bias", "1.inner.proj.bias"}
    assert decay == {"0.weight", "1.inner.proj.weight"}

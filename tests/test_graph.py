"""The fusion graph and recipes: layer alignment, site order, layer ranges, error messages, ``_base_``.

Models are tiny dict recipes (64-wide, few-layer timm ViT / VideoMAE / AST, a timm ResNet-18) so
that every test runs in well under a second on a CPU. Call order is observed with forward hooks on
the experts' attention / MLP modules (and CNN stages) and on the fusion operators.
"""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
from torch import nn

import fusionkit
from fusionkit.fusion.bca import BCA
from fusionkit.graph import FusionModel, OperatorSpec
from fusionkit.recipes import RecipeError, load_recipe

BATCH = 2


def spatial_expert(**extra) -> dict:
    return {"type": "timm_vit", "name": "vit_tiny_patch16_224", "img_size": 32, "depth": 3, "embed_dim": 64,
            "num_heads": 4, "frame_select": {"stride": 2, "offset": 1}, **extra}


def temporal_expert(**extra) -> dict:
    return {"type": "videomae_vit", "embed_dim": 64, "depth": 3, "num_heads": 4, "img_size": 32,
            "num_frames": 8, **extra}


def audio_expert(**extra) -> dict:
    return {"type": "ast", "embed_dim": 64, "depth": 3, "num_heads": 4, "num_mel_bins": 32, "max_length": 48,
            **extra}


def cast_recipe() -> dict:
    return {
        "name": "tiny_cast",
        "inputs": {"video": [3, 8, 32, 32]},
        "experts": {"spatial": spatial_expert(adapters={"ratio": 0.25}),
                    "temporal": temporal_expert(adapters={"ratio": 0.25})},
        "fusion": {"bca": {"type": "bca", "experts": ["spatial", "temporal"], "heads": 4, "directions": {
            "t2s": {"query": "spatial", "key": "temporal", "window": "time"},
            "s2t": {"query": "temporal", "key": "spatial", "window": "space"}}}},
        "heads": {"verb": {"type": "linear", "expert": "temporal", "classes": 5},
                  "noun": {"type": "linear", "expert": "spatial", "classes": 7}},
        "trainable": {"unfreeze": ["experts.*.pool_norm.*"]},
    }


def video(seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(BATCH, 3, 8, size, size, generator=torch.Generator().manual_seed(seed))


class Recorder:
    """Forward hooks that append a label to ``calls`` every time a module runs."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.handles = []

    def watch(self, module: nn.Module, label: tuple) -> None:
        self.handles.append(module.register_forward_hook(lambda *_: self.calls.append(label)))

    def watch_model(self, model: FusionModel) -> None:
        for e, expert in model.experts.items():
            for i, layer in enumerate(expert.layers):
                if hasattr(layer, "attend"):
                    self.watch(layer.attn, (e, i, "attn"))
                    self.watch(layer.mlp, (e, i, "mlp"))
                else:
                    self.watch(layer, (e, i, "stage"))
        for name, ops in model.fusions.items():
            for step, op in ops.items():
                self.watch(op, (name, int(step)))


def assert_equals_experts(model: FusionModel, batch: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        fused = model.forward_tokens(batch)
        for e, expert in model.experts.items():
            assert torch.equal(fused[e].x, expert(batch[expert.modality]).x), e


# ---------------------------------------------------------------------------------------------
# alignment and sites


def aligned_recipe() -> dict:
    """VideoMAE of depth 6 beside a ViT of depth 3 whose layers run at steps 1, 3, 5; B-CA after
    attention at those steps, and a second (one-direction) B-CA after the MLP at step 3."""
    r = cast_recipe()
    r["experts"]["spatial"]["align"] = [1, 3, 5]
    r["experts"]["temporal"]["depth"] = 6
    r["fusion"]["bca"]["steps"] = [1, 3, 5]
    r["fusion"]["late"] = {"type": "bca", "experts": ["spatial", "temporal"], "heads": 4, "site": "post_mlp",
                           "steps": [3], "position": "none",
                           "directions": {"s2t": {"query": "temporal", "key": "spatial", "window": "space"}}}
    return r


def test_align_runs_each_layer_at_its_step_and_sites_in_order():
    model = fusionkit.build(aligned_recipe())
    assert model.num_steps == 6
    assert model.align == {"spatial": [1, 3, 5], "temporal": [0, 1, 2, 3, 4, 5]}
    rec = Recorder()
    rec.watch_model(model)
    model.forward_tokens({"video": video()})
    expected = []
    for step in range(6):
        spatial = {1: 0, 3: 1, 5: 2}.get(step)
        # attention of every active expert (recipe order), post_attn operators, MLPs, post_mlp operators
        if spatial is not None:
            expected.append(("spatial", spatial, "attn"))
        expected.append(("temporal", step, "attn"))
        if step in (1, 3, 5):
            expected.append(("bca", step))
        if spatial is not None:
            expected.append(("spatial", spatial, "mlp"))
        expected.append(("temporal", step, "mlp"))
        if step == 3:
            expected.append(("late", 3))
    assert rec.calls == expected
    summary = {row["operator"]: row for row in model.graph_summary()}
    assert summary["bca"]["steps"] == [1, 3, 5] and summary["bca"]["site"] == "post_attn"
    assert summary["late"]["steps"] == [3] and summary["late"]["site"] == "post_mlp"
    assert_equals_experts(model, {"video": video()})


def test_cnn_stages_aligned_to_steps():
    """ResNet-18's four stages at steps 1, 2, 4, 5 beside a 6-layer VideoMAE; a B-CA after each stage
    projects that stage's width (64, 128, 256, 512) into one 32-wide bottleneck."""
    recipe = {
        "inputs": {"video": [3, 8, 32, 32]},
        "experts": {"cnn": {"type": "timm_cnn", "name": "resnet18", "frame_select": {"stride": 2, "offset": 1},
                            "align": [1, 2, 4, 5]},
                    "temporal": temporal_expert(depth=6)},
        "fusion": {"bca": {"type": "bca", "experts": ["cnn", "temporal"], "heads": 4, "site": "post_mlp",
                           "steps": [1, 2, 4, 5], "bottleneck_dim": 32, "position": "none", "directions": {
                               "t2c": {"query": "cnn", "key": "temporal", "window": "space"},
                               "c2t": {"query": "temporal", "key": "cnn", "window": "space"}}}},
    }
    model = fusionkit.build(recipe)
    ops = model.fusions["bca"]
    assert sorted(int(s) for s in ops) == [1, 2, 4, 5]
    assert [ops[s].down["cnn"].in_features for s in ("1", "2", "4", "5")] == [64, 128, 256, 512]
    assert [ops[s].up["cnn"].out_features for s in ("1", "2", "4", "5")] == [64, 128, 256, 512]
    assert all(op.down["temporal"].in_features == 64 and op.width == 32 for op in ops.values())
    rec = Recorder()
    rec.watch_model(model)
    batch = {"video": video()}
    tokens = model.forward_tokens(batch)
    stage_at = {1: 0, 2: 1, 4: 2, 5: 3}
    expected = []
    for step in range(6):
        if step in stage_at:
            expected.append(("cnn", stage_at[step], "stage"))
        expected += [("temporal", step, "attn"), ("temporal", step, "mlp")]
        if step in stage_at:
            expected.append(("bca", step))
    assert rec.calls == expected
    assert tokens["cnn"].x.shape == (BATCH, 4 * 1 * 1, 512)  # 32 px -> 1x1 after the last stage
    assert_equals_experts(model, batch)


def test_align_must_match_depth_and_increase():
    r = cast_recipe()
    del r["experts"]["spatial"]["adapters"]
    r["experts"]["spatial"]["align"] = [0, 2]
    with pytest.raises(ValueError, match=r"experts\.spatial\.align lists 2 steps but the expert has 3 layers"):
        fusionkit.build(r)
    r["experts"]["spatial"]["align"] = [0, 2, 2]
    with pytest.raises(ValueError, match=r"align\.spatial must list 3 increasing.*\[0, 2, 2\]"):
        fusionkit.build(r)
    r["experts"]["spatial"]["align"] = [-1, 0, 1]
    with pytest.raises(ValueError, match=r"align\.spatial"):
        fusionkit.build(r)


def test_align_of_wrong_length_with_adapters_names_align():
    r = cast_recipe()
    r["experts"]["spatial"]["align"] = [0, 2]
    with pytest.raises(ValueError) as info:
        fusionkit.build(r)
    assert "align" in str(info.value), str(info.value)


def test_post_mlp_site_runs_after_the_mlp():
    model = fusionkit.build(cast_recipe(), overrides=["fusion.bca.site=post_mlp", "fusion.bca.steps=[0]"])
    rec = Recorder()
    rec.watch_model(model)
    model.forward_tokens({"video": video()})
    assert rec.calls[:5] == [("spatial", 0, "attn"), ("temporal", 0, "attn"), ("spatial", 0, "mlp"),
                             ("temporal", 0, "mlp"), ("bca", 0)]


def test_unknown_site_fails():
    with pytest.raises(ValueError, match="unknown site 'post_atn'.*post_attn"):
        fusionkit.build(cast_recipe(), overrides=["fusion.bca.site=post_atn"])


# ---------------------------------------------------------------------------------------------
# layer ranges


def steps_of(model) -> list[int]:
    return sorted(int(s) for s in model.fusions["bca"])


def test_layer_selection_forms():
    assert steps_of(fusionkit.build(cast_recipe())) == [0, 1, 2]
    assert steps_of(fusionkit.build(cast_recipe(), ["fusion.bca.steps=[2,0]"])) == [0, 2]
    assert steps_of(fusionkit.build(cast_recipe(), ["fusion.bca.steps=[-1]"])) == [2]
    assert steps_of(fusionkit.build(cast_recipe(), ["fusion.bca.steps='1:'"])) == [1, 2]
    r = cast_recipe()
    r["fusion"]["bca"]["steps"] = "0:2"
    assert steps_of(fusionkit.build(r)) == [0, 1]


@pytest.mark.parametrize("layers", ["[7]", "[0,3]", "[-4]"])
def test_layers_outside_the_steps_fail(layers):
    with pytest.raises(RecipeError, match=r"fusion\.bca\.steps.*outside the graph's 3 steps"):
        fusionkit.build(cast_recipe(), [f"fusion.bca.steps={layers}"])


def test_layer_range_outside_the_steps_fails():
    r = cast_recipe()
    r["fusion"]["bca"]["steps"] = "9:12"
    try:
        model = fusionkit.build(r)
    except RecipeError as err:
        assert "9:12" in str(err) or "outside" in str(err)
        return
    raise AssertionError(f"layers '9:12' on a 3-step graph built an operator with steps {steps_of(model)}")


def test_operator_step_outside_graph_fails_directly():
    model = fusionkit.build(cast_recipe(), ["fusion.bca=null"])
    spec = OperatorSpec("x", BCA, ["spatial", "temporal"], [5], options={
        "heads": 4, "directions": {"t2s": {"query": "spatial", "key": "temporal", "window": "time"}}})
    with pytest.raises(ValueError, match=r"operator 'x': step 5 is outside the graph's 3 steps \(0-2\)"):
        FusionModel(dict(model.experts), [spec], {}, {"video": (3, 8, 32, 32)})


# ---------------------------------------------------------------------------------------------
# error messages


def test_head_reading_unknown_expert_fails():
    with pytest.raises(RecipeError, match=r"heads\.x.*'nope'"):
        fusionkit.build(cast_recipe(), ["heads.x={type: linear, expert: nope, classes: 3}"])

    class Ghost(nn.Module):
        inputs = {"ghost": None}

    model = fusionkit.build(cast_recipe(), ["fusion.bca=null"])
    with pytest.raises(ValueError, match=r"head 'g' reads unknown expert\(s\) \['ghost'\]"):
        FusionModel(dict(model.experts), [], {"g": Ghost()}, {"video": (3, 8, 32, 32)})


def test_expert_layer_of_neither_kind_fails_naming_expert_and_index():
    model = fusionkit.build(cast_recipe(), ["fusion.bca=null"])
    experts = dict(model.experts)
    experts["temporal"].layers[1] = nn.Linear(4, 4)  # neither a StepLayer nor a Stage
    with pytest.raises(TypeError, match=r"expert 'temporal': layers\[1\] is a Linear, neither a StepLayer"):
        FusionModel(experts, [], {}, {"video": (3, 8, 32, 32)})


def test_operator_joining_unknown_expert_fails():
    with pytest.raises(RecipeError, match=r"operator 'bca' joins unknown expert\(s\) \['ghost'\]"):
        fusionkit.build(cast_recipe(), ["fusion.bca.experts=[spatial,ghost]"])


def test_missing_batch_key_names_expert_and_key():
    r = cast_recipe()
    r["inputs"]["audio"] = [48, 32]
    r["experts"]["sound"] = audio_expert()
    model = fusionkit.build(r)
    with pytest.raises(KeyError) as info:
        model.forward_tokens({"video": video()})
    msg = str(info.value)
    assert "'sound'" in msg and "['audio']" in msg
    with pytest.raises(KeyError, match="'spatial'.*'video'"):
        model({"audio": torch.randn(BATCH, 48, 32)})
    out = model({"video": video(), "audio": torch.randn(BATCH, 48, 32)})
    assert {k: tuple(v.shape) for k, v in out.items()} == {"verb": (BATCH, 5), "noun": (BATCH, 7)}


def test_missing_input_shape_names_expert():
    r = cast_recipe()
    r["experts"]["sound"] = audio_expert()
    with pytest.raises(RecipeError, match="expert 'sound' reads modality 'audio'.*needs an entry inputs.audio "
                                          r"\(one sample's shape\) and a data set whose items carry 'audio'"):
        fusionkit.build(r)


@pytest.mark.parametrize("override, where, hint", [
    ("fusion.bca.rato=0.25", "fusion.bca.rato", "ratio"),
    ("heads.verb.clases=3", "heads.verb.clases", "classes"),
    ("fusoin={}", "fusoin", "fusion"),
    ("experts.spatial.adapters.rato=0.5", "experts.spatial.adapters.rato", "ratio"),
    ("experts.temporal.embed_dimm=32", "experts.temporal.embed_dimm", "embed_dim"),
    ("trainable.unfrezze=[]", "trainable.unfrezze", "unfreeze"),
])
def test_recipe_typos_name_the_closest_keys(override, where, hint):
    with pytest.raises(RecipeError) as info:
        fusionkit.build(cast_recipe(), [override])
    msg = str(info.value)
    assert f"'{where}'" in msg
    assert hint in msg.split("closest valid keys:")[1]


def test_graph_given_keys_and_bad_overrides():
    with pytest.raises(RecipeError, match="set by the fusion graph"):
        fusionkit.build(cast_recipe(), ["fusion.bca.dims={}"])
    with pytest.raises(RecipeError, match="key=value"):
        fusionkit.build(cast_recipe(), ["fusion.bca.ratio"])
    with pytest.raises(ValueError, match=r"pool_nrom.*matches no parameter; closest names: experts\.temporal\.pool_norm"):
        fusionkit.build(cast_recipe(), ["trainable.unfreeze=[experts.*.pool_nrom.*]"])


def test_top_level_align_is_applied_or_rejected():
    r = cast_recipe()
    r["experts"]["temporal"]["depth"] = 6
    r["align"] = {"spatial": [1, 3, 5]}
    try:
        model = fusionkit.build(r)
    except RecipeError:
        return
    assert model.align["spatial"] == [1, 3, 5]


# ---------------------------------------------------------------------------------------------
# _base_ inheritance, removal by null


def test_base_inheritance_with_override(tmp_path):
    base = tmp_path / "base.yaml"
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create(cast_recipe()), base)
    sub = tmp_path / "sub"
    sub.mkdir()
    child = sub / "child.yaml"
    child.write_text(textwrap.dedent("""\
        _base_: ../base.yaml
        name: child
        fusion:
          bca:
            ratio: 0.25
        heads:
          noun: null
    """))
    cfg = load_recipe(child, ["fusion.bca.heads=2"])
    assert "_base_" not in cfg
    assert cfg["name"] == "child"
    assert cfg["fusion"]["bca"]["ratio"] == 0.25 and cfg["fusion"]["bca"]["heads"] == 2
    assert set(cfg["fusion"]["bca"]["directions"]) == {"t2s", "s2t"}  # inherited
    model = fusionkit.build(child, ["fusion.bca.heads=2"])
    assert set(model.experts) == {"spatial", "temporal"}
    assert set(model.heads) == {"verb"}
    op = model.fusions["bca"]["0"]
    assert op.width == 16 and op.cross["t2s"].attn.num_heads == 2
    # the override wins over both files
    model = fusionkit.build(child, ["fusion.bca.ratio=1.0"])
    assert model.fusions["bca"]["0"].width == 64


def test_base_list_and_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\ndrop_path: 0.1\n")
    (tmp_path / "b.yaml").write_text("name: b\ninputs: {video: [3, 8, 32, 32]}\n")
    (tmp_path / "c.yaml").write_text("_base_: [a.yaml, b.yaml]\ndescription: c\n")
    cfg = load_recipe(tmp_path / "c.yaml")
    assert cfg == {"name": "b", "drop_path": 0.1, "inputs": {"video": [3, 8, 32, 32]}, "description": "c"}
    (tmp_path / "x.yaml").write_text("_base_: y.yaml\n")
    (tmp_path / "y.yaml").write_text("_base_: x.yaml\n")
    with pytest.raises(RecipeError, match="inherits from itself"):
        load_recipe(tmp_path / "x.yaml")


def test_null_removes_operator_head_and_expert():
    model = fusionkit.build(cast_recipe(), ["fusion.bca=null"])
    assert len(model.fusions) == 0
    assert not any(isinstance(m, BCA) for m in model.modules())
    assert model.graph_summary() == []
    with torch.no_grad():  # adapters alive: the graph still equals each expert alone
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0, 0.02)
    assert_equals_experts(model, {"video": video()})
    model = fusionkit.build(cast_recipe(), ["heads.noun=null", "experts.spatial=null",
                                            "fusion.bca=null"])
    assert set(model.experts) == {"temporal"} and set(model.heads) == {"verb"}


def test_fused_model_differs_from_identity_once_live():
    """Sanity for the tests above: with non-zero B-CA up-projections the graph output changes."""
    torch.manual_seed(0)
    model = fusionkit.build(cast_recipe())
    identity = copy.deepcopy(model)
    identity.fusions = nn.ModuleDict()
    identity._schedule = {s: {site: [] for site in sites} for s, sites in model._schedule.items()}
    batch = {"video": video()}
    with torch.no_grad():
        assert all(torch.equal(a.x, b.x) for a, b in zip(model.forward_tokens(batch).values(),
                                                          identity.forward_tokens(batch).values()))
        for op in model.fusions["bca"].values():
            for up in op.up.values():
                up.weight.normal_(0, 0.1)
        fused = model.forward_tokens(batch)
        alone = identity.forward_tokens(batch)
    assert not torch.allclose(fused["spatial"].x, alone["spatial"].x)
    assert not torch.allclose(fused["temporal"].x, alone["temporal"].x)


def test_building_the_graph_moves_no_batchnorm_statistic():
    """The graph probes its experts with zeros to size the operators: in eval mode, statistics untouched."""
    from fusionkit.experts import TimmCNN
    from fusionkit.graph import FusionModel

    cnn = TimmCNN("resnet18", frozen=False).train()
    before = {k: v.clone() for k, v in cnn.state_dict().items() if "running" in k}
    model = FusionModel({"cnn": cnn}, [], {}, input_shapes={"video": (3, 2, 32, 32)})
    assert cnn.training and model.experts["cnn"] is cnn
    after = {k: v for k, v in cnn.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)

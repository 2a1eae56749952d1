"""Fusion baselines of papers 000/001: lateral connections, late fusion, the test-time ensemble, and
every row of shared/specs/baselines.md as a recipe or a one-line override (exact parameter counts)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusionkit
from fusionkit.attention import TokenLayout
from fusionkit.describe import describe
from fusionkit.fusion.base import SiteState
from fusionkit.engine.ensemble import ensemble
from fusionkit.fusion.late import LateFusion
from fusionkit.fusion.lateral import Lateral, resample_patches
from fusionkit.registry import FUSIONS


def randomize(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def state(x: dict[str, torch.Tensor], layouts: dict[str, TokenLayout]) -> SiteState:
    return SiteState(x=x, layouts=layouts, layers={}, step=0)


# CLIP-like: 2 frames × (CLS + 2×3 patches), width 6; VideoMAE-like: 2 steps × 2×3 patches, width 4
A = TokenLayout(2, 2, 3, extras=1, per_frame_extras=True)
B = TokenLayout(2, 2, 3)


def tokens(layouts: dict[str, TokenLayout], dims: dict[str, int], batch: int = 2, seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {e: torch.randn(batch, layouts[e].length, dims[e], generator=g) for e in layouts}


# lateral ---------------------------------------------------------------------------------------------

def test_lateral_registered_and_documented() -> None:
    assert FUSIONS.get("lateral") is Lateral
    assert Lateral.site == "post_attn" and Lateral.zero_init


def test_lateral_identity_at_init() -> None:
    layouts, dims = {"s": A, "t": B}, {"s": 6, "t": 4}
    op = Lateral(experts=["s", "t"], dims=dims, layouts=layouts)
    x = tokens(layouts, dims)
    out = op(state(x, layouts))
    assert set(out) == {"s", "t"}
    for e in x:
        assert torch.equal(out[e], x[e])


def test_lateral_matches_a_token_loop() -> None:
    layouts, dims = {"s": A, "t": B}, {"s": 6, "t": 4}
    op = Lateral(experts=["s", "t"], dims=dims, layouts=layouts)
    randomize(op)
    x = tokens(layouts, dims)
    out = op(state(x, layouts))
    w_ts, w_st = op.proj["t_to_s"], op.proj["s_to_t"]
    ref_s, ref_t = x["s"].clone(), x["t"].clone()
    for t in range(2):
        frame = []
        for p in range(6):
            s_pos = t * 7 + 1 + p          # CLS first in every frame of s
            t_pos = t * 6 + p
            upd = x["t"][:, t_pos] @ w_ts.weight.T + w_ts.bias
            ref_s[:, s_pos] += upd
            frame.append(upd)
            ref_t[:, t_pos] += x["s"][:, s_pos] @ w_st.weight.T + w_st.bias
        ref_s[:, t * 7] += torch.stack(frame).mean(0)   # the frame's CLS: mean of its frame's updates
    torch.testing.assert_close(out["s"], ref_s)
    torch.testing.assert_close(out["t"], ref_t)


def test_lateral_one_direction_and_errors() -> None:
    layouts, dims = {"s": A, "t": B}, {"s": 6, "t": 4}
    op = Lateral(experts=["s", "t"], dims=dims, layouts=layouts,
                 directions={"t2s": {"query": "s", "key": "t"}, "s2t": None})
    assert list(op.proj) == ["t2s"]
    randomize(op)
    x = tokens(layouts, dims)
    assert set(op(state(x, layouts))) == {"s"}
    assert sum(p.numel() for p in op.parameters()) == 4 * 6 + 6
    with pytest.raises(ValueError, match="not one of the joined experts"):
        Lateral(experts=["s", "t"], dims=dims, layouts=layouts, directions={"x": {"query": "s", "key": "a"}})
    with pytest.raises(ValueError, match="no directions"):
        Lateral(experts=["s", "t"], dims=dims, layouts=layouts, directions={"x": None})
    with pytest.raises(ValueError, match="unknown resample"):
        Lateral(experts=["s", "t"], dims=dims, layouts=layouts, resample="cubic")


def test_lateral_different_grids_nearest_and_per_clip_extras() -> None:
    # source: 4 steps × 2×4 (e.g. audio), per-clip 2 extras; target: 2 steps × 1×2, per-clip CLS
    src, dst = TokenLayout(4, 2, 4, extras=2), TokenLayout(2, 1, 2, extras=1)
    layouts, dims = {"a": src, "v": dst}, {"a": 3, "v": 5}
    op = Lateral(experts=["a", "v"], dims=dims, layouts=layouts, resample="nearest",
                 directions=["a->v"])
    randomize(op)
    x = tokens(layouts, dims)
    out = op(state(x, layouts))["v"]
    w = op.proj["a_to_v"]
    ref = x["v"].clone()
    upd = []
    for t in range(2):
        for c in range(2):
            # nearest: source index floor(i · src / dst) on every axis
            s_tok = 2 + (2 * t) * 8 + 0 * 4 + 2 * c
            u = x["a"][:, s_tok] @ w.weight.T + w.bias
            ref[:, 1 + t * 2 + c] += u
            upd.append(u)
    ref[:, 0] += torch.stack(upd).mean(0)
    torch.testing.assert_close(out, ref)


def test_resample_trilinear_equal_grid_is_identity_and_constant_stays_constant() -> None:
    p = torch.randn(2, 3, 4, 5)
    lay = TokenLayout(3, 2, 2)
    assert resample_patches(p, lay, lay) is p
    const = torch.ones(1, 3, 4, 5) * torch.arange(5.0)
    up = resample_patches(const, lay, TokenLayout(6, 4, 3))
    assert up.shape == (1, 6, 12, 5)
    torch.testing.assert_close(up, torch.ones(1, 6, 12, 5) * torch.arange(5.0))


# late fusion -----------------------------------------------------------------------------------------

def test_late_identity_at_init() -> None:
    layouts, dims = {"s": A, "t": B}, {"s": 6, "t": 4}
    x = tokens(layouts, dims)
    for mode in ("add", "concat"):
        op = LateFusion(experts=["s", "t"], dims=dims, layouts=layouts, mode=mode)
        assert LateFusion.site == "post_mlp" and LateFusion.zero_init
        out = op(state(x, layouts))
        for e in x:
            assert torch.equal(out[e], x[e])


def test_late_add_matches_reference() -> None:
    layouts, dims = {"s": A, "t": B}, {"s": 6, "t": 4}
    op = LateFusion(experts=["s", "t"], dims=dims, layouts=layouts, mode="add")
    randomize(op)
    x = tokens(layouts, dims)
    out = op(state(x, layouts))
    s_patches = torch.cat([x["s"][:, t * 7 + 1: t * 7 + 7] for t in range(2)], dim=1)   # CLS left out
    m_s, m_t = s_patches.mean(1), x["t"].mean(1)
    w_ts, w_st = op.proj["t_to_s"], op.proj["s_to_t"]
    torch.testing.assert_close(out["s"], x["s"] + (m_t @ w_ts.weight.T + w_ts.bias)[:, None])
    torch.testing.assert_close(out["t"], x["t"] + (m_s @ w_st.weight.T + w_st.bias)[:, None])
    assert sum(p.numel() for p in op.parameters()) == (4 * 6 + 6) + (6 * 4 + 4)


def test_late_concat_matches_reference() -> None:
    layouts, dims = {"s": A, "t": B}, {"s": 6, "t": 4}
    op = LateFusion(experts=["s", "t"], dims=dims, layouts=layouts, mode="concat", receivers=["s"])
    randomize(op)
    x = tokens(layouts, dims)
    out = op(state(x, layouts))
    assert set(out) == {"s"}
    m_t = x["t"].mean(1)
    w = op.proj["s"]
    assert w.weight.shape == (6, 6 + 4)
    ref = torch.stack([x["s"][:, i] + torch.cat([x["s"][:, i], m_t], -1) @ w.weight.T + w.bias
                       for i in range(A.length)], dim=1)
    torch.testing.assert_close(out["s"], ref)


def late_graph(overrides: list[str]):
    """Two 3-layer experts (image ViT on frames 1, 3 of 4; VideoMAE), late fusion by addition as the
    recipes place it (``post_mlp``, ``layers: [-1]``), with ``overrides``; projections random."""
    vit = {"img_size": 32, "depth": 3, "embed_dim": 32, "num_heads": 2}
    recipe = {"inputs": {"video": [3, 4, 32, 32]},
              "experts": {"spatial": {"type": "timm_vit", "name": "vit_tiny_patch16_224", "frame_select": {"stride": 2,
                                                                                                   "offset": 1}, **vit},
                          "temporal": {"type": "videomae_vit", "num_frames": 4, **vit}},
              "fusion": {"late": {"type": "late", "experts": ["spatial", "temporal"], "site": "post_mlp",
                                  "steps": [-1], "mode": "add"}},
              "heads": {"verb": {"type": "linear", "expert": "temporal", "classes": 3}}}
    torch.manual_seed(0)
    model = fusionkit.build(recipe, overrides).eval()
    randomize(model.fusions)
    return model


@pytest.mark.parametrize("overrides, step", [([], 2), (["fusion.late.steps=[-2]"], 1)])
def test_late_fusion_after_the_last_or_inside_the_penultimate_layer(overrides, step) -> None:
    """The recipes exchange after the last layer (``layers: [-1]``); the paper's literal "penultimate
    layer" is one override away (``fusion.late.steps=[-2]``): the exchange follows layer L-1's MLP and
    layer L then runs on the fused tokens. Reference: the experts layer by layer, the exchange by hand."""
    model = late_graph(overrides)
    assert [r["steps"] for r in model.graph_summary()] == [[step]]
    g = torch.Generator().manual_seed(1)
    video = torch.randn(2, 3, 4, 32, 32, generator=g)
    got = model.forward_tokens({"video": video})
    tokens = {e: ex.embed(video) for e, ex in model.experts.items()}
    x, layouts = {e: t.x for e, t in tokens.items()}, {e: t.layout for e, t in tokens.items()}
    op = model.fusions.late[str(step)]
    for i in range(3):
        x = {e: model.experts[e].layers[i](x[e], layouts[e]) for e in x}
        if i == step:
            m = {e: x[e][:, layouts[e].patch_index().reshape(-1)].mean(1) for e in x}  # pooled patches
            x = {"spatial": x["spatial"] + op.proj["temporal_to_spatial"](m["temporal"])[:, None],
                 "temporal": x["temporal"] + op.proj["spatial_to_temporal"](m["spatial"])[:, None]}
    for e, ex in model.experts.items():
        torch.testing.assert_close(got[e].x, ex.final_norm(x[e]), atol=1e-5, rtol=1e-5)


def test_late_errors() -> None:
    layouts, dims = {"s": A, "t": B}, {"s": 6, "t": 4}
    with pytest.raises(ValueError, match="unknown mode"):
        LateFusion(experts=["s", "t"], dims=dims, layouts=layouts, mode="mul")
    with pytest.raises(ValueError, match="at least two experts"):
        LateFusion(experts=["s"], dims=dims, layouts=layouts)
    with pytest.raises(ValueError, match="receivers"):
        LateFusion(experts=["s", "t"], dims=dims, layouts=layouts, receivers=["x"])


# test-time ensemble ----------------------------------------------------------------------------------

def test_ensemble_softmax_logits_sigmoid() -> None:
    g = torch.Generator().manual_seed(0)
    logits = {k: torch.randn(3, 5, generator=g) for k in ("a", "b", "c")}
    out = ensemble(logits, {"p": ["a", "b"], "l": {"heads": ["a", "b", "c"], "combine": "logits"},
                            "m": {"heads": ["c"], "combine": "sigmoid"}})
    torch.testing.assert_close(out["p"], (F.softmax(logits["a"], -1) + F.softmax(logits["b"], -1)) / 2)
    torch.testing.assert_close(out["l"], (logits["a"] + logits["b"] + logits["c"]) / 3)
    torch.testing.assert_close(out["m"], logits["c"].sigmoid())
    with pytest.raises(KeyError, match="no logits for head"):
        ensemble(logits, {"p": ["a", "z"]})
    with pytest.raises(ValueError, match="unknown combine"):
        ensemble(logits, {"p": {"heads": ["a"], "combine": "max"}})
    with pytest.raises(ValueError, match="disagree on shape"):
        ensemble({"a": torch.zeros(2, 3), "b": torch.zeros(2, 4)}, {"p": ["a", "b"]})


# every row of the baselines table: recipe / override -> trainable parameters -------------------------

# (recipe, overrides, trainable, total); measured, exact. the CAST paper Table 1 (c) gives identity 18.1M,
# w/o adapter 85.9M, X-attn -> adapter 93.0M, B-CA 44.8M (see docs/baselines.md).
ROWS = {
    "independent, fully fine-tuned": ("cast_independent", [], 172_331_917, 172_331_917),
    "identity (adapters only)": ("cast", ["fusion.bca=null"], 14_510_221, 186_533_773),
    "test-time ensemble": ("cast_ensemble", [], 14_815_514, 186_839_066),
    "late fusion, addition": ("cast_late_add", [], 15_691_405, 187_714_957),
    "late fusion, concatenation": ("cast_late_concat", [], 16_871_053, 188_894_605),
    "lateral connection": ("cast_lateral", [], 28_684_429, 200_707_981),
    "w/o adapter": ("cast", ["fusion.bca.mode=full"], 75_004_045, 247_027_597),
    "X-attn -> adapter": ("cast", ["fusion.bca.mode=full_adapter"], 82_104_973, 254_128_525),
    "T2S only": ("cast", ["fusion.bca.directions.s2t=null"], 32_333_965, 204_357_517),
    "S2T only": ("cast", ["fusion.bca.directions.t2s=null"], 34_066_573, 206_090_125),
    "B-CA (CAST)": ("cast", [], 44_784_781, 216_808_333),
    # EPIC-SOUNDS (the CA²ST paper Tables VIII-IX), CAVA's experts
    "audio only": ("cava_audio_only", [], 7_432_172, 93_617_900),
    "visual only": ("cava_visual_only", [], 7_432_172, 93_230_060),
    "identity (CAVA, adapters only)": ("cava", ["fusion.bca=null"], 14_830_508, 186_814_124),
    "logit ensemble (CAVA)": ("cava_ensemble", [], 14_272_600, 186_256_216),
    "late fusion, addition (CAVA)": ("cava_late_add", [], 16_011_692, 187_995_308),
    "lateral connection (CAVA)": ("cava_lateral", [], 29_004_716, 200_988_332),
    "B-CA (CAVA)": ("cava", [], 43_824_044, 215_807_660),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_baseline_rows_parameter_counts(row: str) -> None:
    recipe, overrides, trainable, total = ROWS[row]
    info = describe(recipe, overrides)
    assert (info["params_trainable"], info["params_total"]) == (trainable, total)


def test_baseline_operator_counts() -> None:
    per_layer = 2 * (768 * 768 + 768)
    assert describe("cast_lateral")["params"]["operators"]["lateral"]["trainable"] == 12 * per_layer
    late = describe("cast_late_add")
    assert late["params"]["operators"]["late"]["trainable"] == per_layer
    assert late["graph"] == [{"operator": "late", "type": "LateFusion", "experts": ["spatial", "temporal"],
                              "steps": [11], "site": "post_mlp"}]
    concat = describe("cast_late_concat")["params"]["operators"]["late"]["trainable"]
    assert concat == 2 * (1536 * 768 + 768)


def test_ensemble_recipe_heads_and_groups() -> None:
    from fusionkit.recipes import load_recipe

    cfg = load_recipe("cast_ensemble")
    heads = {k: v for k, v in cfg["heads"].items() if v is not None}
    groups = cfg["eval"]["ensemble"]
    assert sorted(h for g in groups.values() for h in g["heads"]) == sorted(heads)
    for name, group in groups.items():
        assert {heads[h]["classes"] for h in group["heads"]} == {97 if name == "verb" else 300}
        assert {heads[h]["expert"] for h in group["heads"]} == {"spatial", "temporal"}

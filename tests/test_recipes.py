"""The shipped recipes: they build, and their parameter counts are the papers' (or the documented ones).

The full-size recipes are built on the meta device (``fusionkit.describe.MetaMode``: every parameter
with its real shape and ``requires_grad``, no memory, no initialisation), which is all a count needs.
"""

from __future__ import annotations

import fnmatch
import functools
from pathlib import Path

import pytest
import torch

import fusionkit
from fusionkit.describe import MetaMode
from fusionkit.recipes import RECIPE_DIR, RecipeError, load_recipe

# (total, trainable): the official CAST checkpoints exactly; CAVA / CA²ST as documented in docs/recipes.md.
# The baselines' counts are pinned in test_baselines.py, LAVISH / AV-STFP / MM-ViT in their own tests, and
# every recipe file builds in test_swap.py::test_describe_every_recipe.
COUNTS = {
    "cast": (216_808_333, 44_784_781),
    "cast_k400": (217_402_384, 45_378_832),
    "cava": (215_807_660, 43_824_044),
    "ca2st": (346_797_932, 88_588_652),
    "ca2st_shared": (325_508_972, 67_299_692),  # one cross-attention per expert pair (docs/operators.md)
    "cast_resnet": (127_580_877, 17_847_181),
    "tiny": (84_585, 14_697),
}
RECIPES = sorted(COUNTS)
SLOW = {"ca2st", "ca2st_shared"}  # three full-size experts: over 5 s even on the meta device


def counts(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


@functools.cache
def meta_model(name: str) -> torch.nn.Module:
    """``fusionkit.build(name)`` on the meta device, built once per test session."""
    with MetaMode(build=True):
        model = fusionkit.build(name)
    assert all(p.is_meta for p in model.parameters()), name
    return model


@pytest.fixture(params=[pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in RECIPES])
def built(request):
    return request.param, meta_model(request.param)


def test_every_recipe_file_loads():
    for path in sorted(Path(RECIPE_DIR).glob("*.yaml")):
        assert load_recipe(path)["experts"], path


def test_recipe_parameter_counts(built):
    name, model = built
    assert counts(model) == COUNTS[name]


def test_meta_build_counts_what_a_real_build_counts():
    assert counts(fusionkit.build("tiny")) == counts(meta_model("tiny")) == COUNTS["tiny"]


@pytest.mark.slow  # two three-expert builds
def test_ca2st_shared_has_one_cross_attention_per_pair():
    """``share: pair`` removes three of the six 384-wide cross-attentions of every layer, nothing else."""
    literal, shared = meta_model("ca2st"), meta_model("ca2st_shared")
    d = 384
    assert counts(literal)[1] - counts(shared)[1] == 12 * 3 * (4 * d * d + 4 * d) == 21_288_960
    for op in shared.fusions.bca.values():
        assert sorted(op.pairs) == ["audio_spatial", "audio_temporal", "spatial_temporal"]
        assert op.attention_of("t2s") is op.attention_of("s2t") and op.cross["t2s"].pos_q.shape == (8, d)


def test_cast_bca_alone_is_30_3m():
    assert sum(p.numel() for p in meta_model("cast").fusions.parameters()) == 30_274_560  # 2,522,880 per layer


# (total, trainable) as the papers print them, with half their last digit: the built models must round to them.
PAPER = {
    "cast": ((217e6, 0.5e6), (44.8e6, 0.05e6)),  # CAST Table 1 (c) "B-CAST 44.8" tuned; CA²ST's cost table 217M
    "cava": ((216e6, 0.5e6), (43.8e6, 0.05e6)),  # CA²ST Tables XII, XIV, XVIII
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_built_model_matches_paper_within_rounding(name):
    total, trainable = counts(meta_model(name))
    (paper_total, tol_total), (paper_trainable, tol_trainable) = PAPER[name]
    assert abs(total - paper_total) <= tol_total, (name, total, paper_total)
    assert abs(trainable - paper_trainable) <= tol_trainable, (name, trainable, paper_trainable)


def test_trainable_set_is_adapters_operators_heads_and_unfrozen_patterns(built):
    _, model = built
    unfreeze = (model.recipe.get("trainable") or {}).get("unfreeze") or []
    for name, p in model.named_parameters():
        expected = (not name.startswith("experts.")) or "adapter" in name or \
            any(fnmatch.fnmatch(name, pattern) for pattern in unfreeze)
        assert p.requires_grad == expected, name


def test_unknown_recipe_names_closest():
    with pytest.raises(RecipeError, match="closest recipes: cast"):
        load_recipe("castt")


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_identity_at_init_full_size(name):
    """At init (zero up-projections and adapters) every expert computes what it computes alone."""
    model = fusionkit.build(name).eval()
    torch.manual_seed(0)
    batch = {m: torch.randn(1, *shape) for m, shape in model.input_shapes.items()}
    with torch.no_grad():
        tokens = model.forward_tokens(batch)
        for e, expert in model.experts.items():
            assert torch.equal(tokens[e].x, expert(batch[expert.modality]).x), e

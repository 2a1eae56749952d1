"""The shipped recipes: they build, and their parameter counts are the papers' (or the documented ones)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
import torch

import fusionkit
from fusionkit.recipes import RECIPE_DIR, RecipeError, load_recipe

# (total, trainable): the official CAST checkpoints exactly; CAVA / CA²ST as documented in docs/recipes.md.
# The baselines' counts are pinned in test_baselines.py, LAVISH / AV-STFP / MM-ViT in their own tests, and
# every recipe file builds in test_swap.py::test_describe_every_recipe.
COUNTS = {
    "cast": (216_808_333, 44_784_781),
    "cast_k400": (217_402_384, 45_378_832),
    "cava": (215_807_660, 43_824_044),
    "ca2st": (346_797_932, 88_588_652),
    "cast_resnet": (127_580_877, 17_847_181),
    "tiny": (84_585, 14_697),
}
RECIPES = sorted(COUNTS)


def counts(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


@pytest.fixture(scope="module", params=RECIPES)
def built(request):
    return request.param, fusionkit.build(request.param)


def test_every_recipe_file_loads():
    for path in sorted(Path(RECIPE_DIR).glob("*.yaml")):
        assert load_recipe(path)["experts"], path


def test_recipe_parameter_counts(built):
    name, model = built
    assert counts(model) == COUNTS[name]


def test_cast_bca_alone_is_30_3m():
    model = fusionkit.build("cast")
    assert sum(p.numel() for p in model.fusions.parameters()) == 30_274_560  # 2,522,880 per layer


def test_cava_matches_paper_within_rounding():
    total, trainable = COUNTS["cava"]
    assert abs(trainable - 43.8e6) < 0.05e6 and abs(total - 216e6) < 0.5e6  # paper 000 Tables XII, XIV, XVIII


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

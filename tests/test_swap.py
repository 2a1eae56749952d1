"""The swap test: every registered fusion operator drops into the same two-expert graph by one override.

This is the reason the toolkit exists: experts, adapters and heads stay as they are, one line of a
recipe (``fusion.op.type=NAME``) changes how the experts exchange information. For EVERY name in
``FUSIONS`` (whatever is registered when the test runs, plugins included) the tiny graph is built,
run forward and backward, and

* gradients reach exactly the trainable parameters (every operator parameter trains and gets a
  gradient; frozen expert weights get none);
* operators that declare ``zero_init = True`` leave the experts' final tokens equal to the experts
  alone at init.

Conventions for operators (class attributes, all optional):

* ``zero_init = True``: the operator is the identity at init (checked here).
* ``example = {...}``: operator options (and the graph keys ``experts`` / ``site`` / ``layers``) that
  the tiny graph needs, merged into ``fusion.op`` (e.g. ``{"heads": 4}`` when the default head
  count does not divide the tiny width).
* ``example_recipe = {...}``: a recipe fragment merged over the tiny base recipe, for operators
  that need other experts or inputs (three experts, a shared backbone with an audio stream, ...).

Also: ``describe`` works (parameters and GFLOPs) for every recipe file in ``recipes/``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

import fusionkit
from fusionkit.attention import use_backend
from fusionkit.describe import describe
from fusionkit.heads import total_loss
from fusionkit.recipes import load_recipe
from fusionkit.registry import FUSIONS

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# A per-frame image ViT (frames 1, 3 of 4) beside a VideoMAE tubelet ViT (2 tubelets of 2 frames):
# both have a 2-step time axis on a 2×2 patch grid, width 64, 2 layers, adapters, one head each.
BASE: dict[str, Any] = {
    "name": "swap",
    "inputs": {"video": [3, 4, 32, 32]},
    "experts": {
        "spatial": {"type": "timm_vit", "name": "vit_tiny_patch16_224", "img_size": 32, "depth": 2,
                    "embed_dim": 64, "num_heads": 4, "frame_select": {"stride": 2, "offset": 1},
                    "adapters": {"ratio": 0.25}},
        "temporal": {"type": "videomae_vit", "embed_dim": 64, "depth": 2, "num_heads": 4, "img_size": 32,
                     "num_frames": 4, "adapters": {"ratio": 0.25}},
    },
    "fusion": {"op": {"type": "bca", "experts": ["spatial", "temporal"]}},
    "heads": {"verb": {"type": "linear", "expert": "temporal", "classes": 5},
              "noun": {"type": "linear", "expert": "spatial", "classes": 7}},
    "trainable": {"unfreeze": ["experts.*.pool_norm.*"]},
}

OPERATORS = FUSIONS.names()


def example_of(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options for ``fusion.op``, recipe fragment) that operator ``name`` declares for this test."""
    cls = FUSIONS.get(name)
    return dict(cls.example), dict(cls.example_recipe)


def declares_zero_init(name: str) -> bool:
    return FUSIONS.get(name).zero_init


def swap_recipe(name: str) -> tuple[dict[str, Any], list[str]]:
    """The base recipe with ``name``'s declared example merged in, and the one swapping override."""
    options, fragment = example_of(name)
    cfg = OmegaConf.merge(OmegaConf.create(copy.deepcopy(BASE)), OmegaConf.create(fragment),
                          OmegaConf.create({"fusion": {"op": options}}))
    return OmegaConf.to_container(cfg), [f"fusion.op.type={name}"]


def batch_for(model: torch.nn.Module, size: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {k: torch.randn(size, *v) for k, v in model.input_shapes.items()}


def targets_for(model: torch.nn.Module, size: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {k: torch.randint(0, h.num_classes, (size,), generator=g) for k, h in model.heads.items()}


def perturb_zero_parameters(model: torch.nn.Module) -> None:
    """Give every all-zero trainable tensor (zero-init up-projections, gates) small random values,
    so that gradients flow through the paths they close at init."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def test_every_operator_is_covered() -> None:
    assert "bca" in OPERATORS and "lateral" in OPERATORS and "late" in OPERATORS


def test_base_recipe_swaps_by_one_line() -> None:
    cfg, overrides = swap_recipe("lateral")
    assert overrides == ["fusion.op.type=lateral"]
    model = fusionkit.build(cfg, overrides)
    assert [r["type"] for r in model.graph_summary()] == ["Lateral"]
    assert {e: ex.depth for e, ex in model.experts.items()} == {"spatial": 2, "temporal": 2}


@pytest.mark.parametrize("name", OPERATORS)
def test_swap_forward_backward(name: str) -> None:
    cfg, overrides = swap_recipe(name)
    torch.manual_seed(0)
    model = fusionkit.build(cfg, overrides)
    assert list(model.fusions) == ["op"]
    assert type(next(iter(model.fusions["op"].values()))) is FUSIONS.get(name)
    op_params = dict(model.fusions.named_parameters())
    assert all(p.requires_grad for p in op_params.values()), \
        f"{name}: frozen operator parameters {[k for k, p in op_params.items() if not p.requires_grad]}"
    perturb_zero_parameters(model)
    model.train()
    batch = batch_for(model)
    with use_backend("eager"):
        logits = model(batch)
    assert set(logits) == set(model.heads)
    for head, out in logits.items():
        assert out.shape == (2, model.heads[head].num_classes)
        assert torch.isfinite(out).all()
    loss, _ = total_loss(model.heads, logits, targets_for(model))
    loss.backward()
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    reached = {k for k, p in model.named_parameters() if p.grad is not None}
    assert trainable - reached == set(), f"{name}: trainable parameters without a gradient"
    assert reached - trainable == set(), f"{name}: gradients on frozen parameters"
    assert any(k.startswith("experts.") and "_adapter." in k for k in trainable)  # the experts' adapters train
    assert all(torch.isfinite(p.grad).all() for k, p in model.named_parameters() if p.grad is not None)


@pytest.mark.parametrize("name", [n for n in OPERATORS if declares_zero_init(n)])
def test_swap_identity_at_init(name: str) -> None:
    cfg, overrides = swap_recipe(name)
    torch.manual_seed(0)
    model = fusionkit.build(cfg, overrides).eval()
    batch = batch_for(model)
    with torch.no_grad(), use_backend("eager"):
        fused = model.forward_tokens(batch)
        alone = {e: ex(batch[ex.modality]) for e, ex in model.experts.items()}
    for e in alone:
        assert fused[e].layout == alone[e].layout
        torch.testing.assert_close(fused[e].x, alone[e].x, atol=1e-5, rtol=1e-5,
                                   msg=lambda m, e=e: f"{name} (zero_init) changes expert {e!r} at init: {m}")


def test_zero_init_declarations_hold_for_the_baselines() -> None:
    for name in ("lateral", "late"):
        assert FUSIONS.get(name).zero_init is True


# describe on every shipped recipe -------------------------------------------------------------

RECIPE_FILES = sorted(p.name for p in RECIPES.glob("*.yaml"))
SLOW_TO_DESCRIBE = {"lavish_swinv2_l.yaml"}  # 6.5 s on 2 cores (SwinV2-L); the others take under 5 s


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=pytest.mark.slow) if r in SLOW_TO_DESCRIBE else r
                                    for r in RECIPE_FILES])
def test_describe_every_recipe(recipe: str) -> None:
    info = describe(RECIPES / recipe)
    assert info["params_total"] > 0
    assert 0 < info["params_trainable"] <= info["params_total"]
    assert info["gflops"] > 0
    assert info["gflops_torch"] == pytest.approx(2 * info["gflops"])
    operators = {k for k, v in (load_recipe(RECIPES / recipe).get("fusion") or {}).items() if v is not None}
    assert {r["operator"] for r in info["graph"]} == operators

"""The frozen-feature cache (fusionkit.feature_cache): which steps are cacheable, equality with the
uncached forward, gradients on exactly the trainable set, misses on new inputs or new weights."""

from __future__ import annotations

import pytest
import torch

import fusionkit
from fusionkit import feature_cache as fc


def batch(seed: int = 0, n: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"video": torch.randn(n, 3, 8, 32, 32, generator=g), "audio": torch.randn(n, 16000, generator=g) * 0.1}


@pytest.mark.parametrize("recipe, expected", [
    ("binding/identity", {"spatial": 4, "temporal": 4, "audio": 4}),   # heads only: every layer
    ("binding/late_add", {"spatial": 3, "temporal": 3, "audio": 3}),   # an operator at the last step
    ("binding/bca", {"spatial": 0, "temporal": 0}),                    # B-CA from the first step
])
def test_cacheable_steps(recipe, expected):
    model = fusionkit.build(recipe)
    assert model.cacheable_steps() == expected


def test_operators_starting_late_leave_a_cacheable_prefix():
    model = fusionkit.build("binding/bca", ["fusion.bca.steps=2:4"])
    assert model.cacheable_steps() == {"spatial": 2, "temporal": 2}


def test_trainable_or_stochastic_layers_are_not_cached():
    model = fusionkit.build("binding/identity", ["trainable.unfreeze=[experts.temporal.blocks.1.*]"])
    assert model.cacheable_steps()["temporal"] == 1
    model = fusionkit.build("binding/identity", ["experts.spatial.drop_path=0.1"])
    steps = model.train().cacheable_steps()
    assert steps["spatial"] == 1  # drop path rises linearly from 0: the first layer has none
    assert model.eval().cacheable_steps()["spatial"] == 4  # eval mode: drop path is off


@pytest.mark.parametrize("recipe", ["binding/identity", "binding/late_add", "binding/ensemble"])
def test_cached_forward_equals_the_plain_forward_and_trains_the_same_set(recipe):
    torch.manual_seed(0)
    model = fusionkit.build(recipe).train()
    for p in model.parameters():  # non-zero trainable weights (zero-initialised projections included)
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    x = batch()
    ref = model(x)
    cache = fc.FeatureCache()
    with fc.enabled(cache):
        first = model(x)                     # computed alone and stored
        second = model(x)                    # read from the cache
        loss = sum(v.square().mean() for v in second.values())
        loss.backward()
    assert cache.hits == 3 * len(model.experts) and cache.misses == 3 * len(model.experts)
    for head in ref:
        torch.testing.assert_close(first[head], ref[head], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(second[head], ref[head], rtol=1e-5, atol=1e-6)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}


def test_new_inputs_and_new_weights_miss():
    model = fusionkit.build("binding/identity").eval()
    cache = fc.FeatureCache()
    with fc.enabled(cache):
        model(batch(0))
        model(batch(1))
        assert cache.hits == 0
        model(batch(0))
        assert cache.hits == 3 * 3
        other = fusionkit.build("binding/identity").eval()  # other random weights: other fingerprints
        out = other(batch(0))
        assert cache.hits == 3 * 3
    torch.testing.assert_close(out["motion"], other(batch(0))["motion"], rtol=1e-5, atol=1e-6)


def test_loading_weights_invalidates_the_fingerprints():
    a, b = fusionkit.build("binding/identity").eval(), fusionkit.build("binding/identity").eval()
    cache = fc.FeatureCache()
    with fc.enabled(cache):
        a(batch())
        a.load_state_dict(b.state_dict())
        out = a(batch())
    assert cache.hits == 0
    torch.testing.assert_close(out["sound"], b(batch())["sound"], rtol=1e-5, atol=1e-6)


def test_budget_stops_adding_entries():
    model = fusionkit.build("binding/identity").eval()
    cache = fc.FeatureCache(max_gb=1e-9)
    with fc.enabled(cache):
        model(batch())
    assert len(cache) == 0 and cache.full == 3 * 3


def test_no_cache_outside_the_block():
    model = fusionkit.build("binding/identity").eval()
    cache = fc.FeatureCache()
    with fc.enabled(cache):
        pass
    model(batch())
    assert len(cache) == 0 and fc.active() is None

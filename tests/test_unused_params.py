"""Trainable parameters without a gradient: found by the probe, named in the warning, DDP's setting."""

import pytest
import torch

from fusionkit import build
from fusionkit.engine import unused
from fusionkit.recipes import RecipeError


def test_probe_finds_the_zero_gradient_t2s_of_the_last_layer_and_restores_the_model():
    torch.manual_seed(0)
    model = build("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = unused.probe(model)
    assert found.unused == ()
    assert found.zero and all(".cross.t2s." in n for n in found.zero), found.zero
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_an_unused_parameter_is_found_reported_and_decides_ddp():
    model = build("tiny")
    extra = next(iter(model.heads.values()))
    extra.register_parameter("orphan", torch.nn.Parameter(torch.ones(3)))
    found = unused.probe(model)
    assert any(n.endswith("orphan") for n in found.unused)
    text = unused.report(found, ddp=True)
    assert "1 trainable parameter tensor(s) get no gradient" in text and "orphan" in text
    assert "DDP find_unused_parameters=True" in text
    assert unused.find_unused("auto", found) is True
    assert unused.find_unused("auto", unused.GradientProbe()) is False
    with pytest.raises(RecipeError, match="find_unused_parameters is false but 1 trainable"):
        unused.find_unused(False, found)
    assert unused.report(unused.GradientProbe()) is None

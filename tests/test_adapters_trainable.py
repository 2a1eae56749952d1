"""Adapters (zero at init, placement) and the trainable-parameter policy."""

from __future__ import annotations

import pytest
import torch

from fusionkit.adapters import Adapter, attach_adapters
from fusionkit.experts import TimmCNN, TimmViT
from fusionkit.trainable import TrainablePolicy, trainable_names, trainable_report


def tiny_vit() -> TimmViT:
    torch.manual_seed(0)
    return TimmViT("vit_tiny_patch16_224", img_size=32, depth=3).eval()


def test_adapter_shape_and_zero_init():
    a = Adapter(64, ratio=0.25)
    assert a.D_fc1.out_features == 16 and a.D_fc2.out_features == 64
    assert torch.count_nonzero(a(torch.randn(5, 64))) == 0
    assert sum(p.numel() for p in a.parameters()) == 64 * 16 + 16 + 16 * 64 + 64


def test_attached_adapters_leave_expert_unchanged_at_init_and_act_once_nonzero():
    expert = tiny_vit()
    video = torch.randn(2, 3, 2, 32, 32)
    before = expert(video).x
    adapters = attach_adapters(expert, ratio=0.5, layers=[0, -1])
    assert len(adapters) == 4 and expert.layers[2].mlp_adapter is adapters[3]
    assert expert.layers[1].attn_adapter is None
    assert torch.equal(expert(video).x, before)
    with torch.no_grad():
        adapters[0].D_fc2.weight.normal_()
    assert not torch.allclose(expert(video).x, before)


def test_mlp_adapter_is_parallel_and_scaled():
    expert = tiny_vit()
    block = expert.layers[0]
    x = torch.randn(1, 5, block.dim)
    attach_adapters(expert, attn=False, mlp_scale=0.5, layers=[0])
    with torch.no_grad():
        block.mlp_adapter.D_fc2.weight.normal_()
    h = block.norm2(x)
    want = x + block.mlp(h) + 0.5 * block.mlp_adapter(h)
    torch.testing.assert_close(block.feed_forward(x), want)


def test_attach_adapters_refuses_cnn_stages():
    with pytest.raises(TypeError, match="not a transformer Block"):
        attach_adapters(TimmCNN("resnet18"))


def test_gradients_reach_exactly_the_trainable_set():
    expert = tiny_vit()
    attach_adapters(expert, ratio=0.25)
    TrainablePolicy(unfreeze=["final_norm.*"], freeze=["vit.blocks.0.attn_adapter.*"]).apply(expert)
    expected = trainable_names(expert)
    assert expected and all(n.startswith(("final_norm.", "vit.blocks.")) for n in expected)
    assert not any(n.startswith("vit.blocks.0.attn_adapter") for n in expected)
    for block in expert.layers:  # non-zero up-projections so that every trainable tensor gets a gradient
        for a in (block.attn_adapter, block.mlp_adapter):
            torch.nn.init.normal_(a.D_fc2.weight, std=0.02)
    expert.train()
    expert(torch.randn(2, 3, 2, 32, 32)).x.square().mean().backward()
    with_grad = {n for n, p in expert.named_parameters() if p.grad is not None}
    assert with_grad == expected
    assert all(p.grad.abs().sum() > 0 for n, p in expert.named_parameters() if n in expected)


def test_policy_pattern_typo_names_closest_parameters():
    with pytest.raises(ValueError, match=r"'final_nrom.\*' matches no parameter; closest names: final_norm"):
        TrainablePolicy(unfreeze=["final_nrom.*"]).apply(tiny_vit())


def test_report_counts():
    expert = tiny_vit()
    adapters = attach_adapters(expert, ratio=0.25)
    rows = trainable_report(expert, depth=1)
    total = rows[-1]
    assert total.name == "total"
    assert total.total == sum(p.numel() for p in expert.parameters())
    assert total.trainable == sum(p.numel() for a in adapters for p in a.parameters())


def test_layer_patterns_name_every_experts_layers_one_way():
    """``experts.*.layers.<i>.*`` reaches layer ``i`` of a timm ViT (stored under ``vit.blocks``) and of a
    VideoMAE ViT (``blocks``) alike; the stored names stay, and only those parameters train."""
    import fusionkit

    model = fusionkit.build("tiny", ["trainable.unfreeze=[experts.*.layers.1.mlp.*]"])
    unfrozen = {n for n in trainable_names(model) if n.startswith("experts.") and "adapter" not in n}
    assert unfrozen == {f"experts.{e}.{stored}.1.mlp.{fc}.{t}" for e, stored in
                                      (("spatial", "vit.blocks"), ("temporal", "blocks"))
                                      for fc in ("fc1", "fc2") for t in ("weight", "bias")}
    with pytest.raises(ValueError, match=r"'experts\.\*\.layers\.7\.\*' matches no parameter; closest names: "
                                         r"experts\.spatial\.layers\."):
        fusionkit.build("tiny", ["trainable.unfreeze=[experts.*.layers.7.*]"])

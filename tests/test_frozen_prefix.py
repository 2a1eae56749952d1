"""Frozen work before the first operator records no autograd graph (issue 10: nothing upstream
requires grad, so torch builds none, without a no_grad switch)."""

import torch

import fusionkit

FROZEN = ["experts.spatial.adapters=null", "experts.temporal.adapters=null", "trainable.unfreeze=[]"]


def graph_flags(layers: str) -> dict[tuple[str, int, str], bool]:
    """``{(expert, layer, child): output requires grad}`` of one training-mode forward of tiny."""
    model = fusionkit.build("tiny", [f"fusion.bca.steps={layers}", *FROZEN]).train()
    seen = {}
    for e, expert in model.experts.items():
        for i, layer in enumerate(expert.layers):
            for name, child in layer.named_children():
                child.register_forward_hook(
                    lambda mod, inp, out, k=(e, i, name): seen.__setitem__(k, out.requires_grad))
    model({"video": torch.randn(2, 3, 4, 32, 32), "audio": torch.randn(2, 1600)})
    return seen


def test_no_graph_before_the_first_operator_and_one_after_it():
    late = graph_flags("1:2")  # B-CA (post_attn) at step 1 only
    recorded = {k for k, v in late.items() if v}
    assert recorded == {(e, 1, c) for e in ("spatial", "temporal") for c in ("norm2", "mlp", "ls2", "drop_path2")}
    early = graph_flags("0:2")  # B-CA from step 0: the first MLPs are already in the graph
    assert early[("spatial", 0, "mlp")] and early[("temporal", 1, "attn")]
    assert not early[("spatial", 0, "attn")]

"""``fusionkit.describe``: parameters, GFLOPs per view (meta device vs real CPU), graph, CLI, CAST."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from rich.console import Console
from torch import nn

import fusionkit
from fusionkit.attention import use_backend
from fusionkit.describe import add_command, count_flops, describe, flop_counter, render

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# CAST in miniature: a per-frame timm ViT (frames 1, 3) + a VideoMAE tubelet ViT (2 tubelets of 2
# frames), B-CA between them at both steps, one linear head on each expert.
TINY = {
    "name": "tiny",
    "inputs": {"video": [3, 4, 32, 32]},
    "experts": {
        "spatial": {"type": "timm_vit", "name": "vit_tiny_patch16_224", "img_size": 32, "depth": 2,
                    "frame_select": {"stride": 2, "offset": 1}},
        "temporal": {"type": "videomae_vit", "embed_dim": 64, "depth": 2, "num_heads": 4, "img_size": 32,
                     "num_frames": 4},
    },
    "fusion": {"bca": {"type": "bca", "experts": ["spatial", "temporal"], "ratio": 0.5, "heads": 4,
                       "directions": {"t2s": {"query": "spatial", "key": "temporal", "window": "time"},
                                      "s2t": {"query": "temporal", "key": "spatial", "window": "space"}}}},
    "heads": {"verb": {"type": "linear", "expert": "temporal", "classes": 5},
              "noun": {"type": "linear", "expert": "spatial", "classes": 7}},
}


@pytest.fixture(scope="module")
def tiny_info() -> dict:
    return describe(TINY)


def test_params_match_the_model(tiny_info: dict) -> None:
    model = fusionkit.build(TINY)
    params = list(model.parameters())
    assert tiny_info["params_total"] == sum(p.numel() for p in params)
    assert tiny_info["params_trainable"] == sum(p.numel() for p in params if p.requires_grad)
    groups = tiny_info["params"]
    assert set(groups["experts"]) == {"spatial", "temporal"}
    assert set(groups["operators"]) == {"bca"}
    assert set(groups["heads"]) == {"verb", "noun"}
    for name, expert in model.experts.items():
        assert groups["experts"][name]["total"] == sum(p.numel() for p in expert.parameters())
    assert groups["operators"]["bca"]["total"] == groups["operators"]["bca"]["trainable"] == \
        sum(p.numel() for p in model.fusions["bca"].parameters())
    assert groups["heads"]["verb"]["total"] == 64 * 5 + 5
    assert groups["heads"]["noun"]["total"] == 192 * 7 + 7
    assert sum(r["total"] for g in groups.values() for r in g.values()) == tiny_info["params_total"]


def test_shared_parameters_count_once() -> None:
    model = fusionkit.build(TINY)
    shared = nn.Parameter(torch.zeros(10))
    model.heads["verb"].extra = nn.ParameterList([shared])
    model.heads["noun"].extra = nn.ParameterList([shared])
    info = describe(model)
    assert info["params_total"] == sum(p.numel() for p in model.parameters())  # parameters() dedupes
    assert info["params"]["heads"]["verb"]["total"] == 64 * 5 + 5 + 10
    assert info["params"]["heads"]["noun"]["total"] == 192 * 7 + 7


class _OneLinear(nn.Module):
    input_shapes = {"x": (16,)}

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, batch: dict) -> dict:
        return {"out": self.fc(batch["x"])}


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_linear_flops_by_hand(device: str) -> None:
    model = _OneLinear()
    counted = count_flops(model if device == "cpu" else model.to_empty(device="meta"), device)
    assert counted["total"] == 2 * 16 * 8  # torch: multiply-add = 2 FLOPs


def test_tiny_known_parts_by_hand(tiny_info: dict) -> None:
    b = tiny_info["flops_breakdown"]
    assert b["heads"]["verb"] == pytest.approx(64 * 5 / 1e9)  # multiply-adds
    assert b["heads"]["noun"] == pytest.approx(192 * 7 / 1e9)
    # patch embeddings: 2 frames x 4 patches of 3x16x16 -> 192, 2x2x2 tubelets of 3x2x16x16 -> 64
    macs = 2 * 4 * (3 * 16 * 16) * 192 + 8 * (3 * 2 * 16 * 16) * 64
    model = fusionkit.build(TINY).eval()
    counter = flop_counter()
    with torch.no_grad(), counter:
        model(model_batch(model))
    conv = counter.get_flop_counts()["Global"][torch.ops.aten.convolution]
    assert conv == 2 * macs
    assert tiny_info["gflops_torch"] == pytest.approx(2 * tiny_info["gflops"])
    assert "multiply-add = 1 FLOP" in tiny_info["flops_convention"]
    total = sum(v for g in ("experts", "operators", "heads") for v in b[g].values()) + b["unattributed"]
    assert total == pytest.approx(tiny_info["gflops"])


def model_batch(model: nn.Module) -> dict:
    return {k: torch.zeros(1, *v) for k, v in model.input_shapes.items()}


def test_sdpa_is_counted_on_cpu() -> None:
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 3)
    counter = flop_counter()
    with counter:
        F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * 5 * 4 * 7 + 2 * 5 * 7 * 3)


def test_meta_count_equals_real_cpu_count(tiny_info: dict) -> None:
    assert tiny_info["flops_device"] == "meta" and "flops_note" not in tiny_info
    real = describe(TINY, device="cpu")
    assert real["flops_device"] == "cpu"
    assert real["gflops_torch"] == tiny_info["gflops_torch"] > 0
    assert real["flops_breakdown"] == tiny_info["flops_breakdown"]
    with use_backend("eager"):  # attention as plain matmuls: same count as the SDPA formula
        eager = describe(TINY, device="cpu")
    assert eager["gflops_torch"] == tiny_info["gflops_torch"]
    # a built model is copied onto meta, not moved
    model = fusionkit.build(TINY)
    from_model = describe(model)
    assert from_model["gflops_torch"] == tiny_info["gflops_torch"]
    assert from_model["params_trainable"] == tiny_info["params_trainable"]
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_falls_back_to_a_real_forward(monkeypatch: pytest.MonkeyPatch, tiny_info: dict) -> None:
    import fusionkit.describe as d

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise NotImplementedError("no meta kernel")

    monkeypatch.setattr(d, "_build_meta", broken)
    info = describe(TINY)
    assert info["flops_device"] == "cpu" and "no meta kernel" in info["flops_note"]
    assert info["gflops"] == tiny_info["gflops"]


def test_graph_rows(tiny_info: dict) -> None:
    assert tiny_info["graph"] == [{"operator": "bca", "type": "BCA", "experts": ["spatial", "temporal"],
                                   "steps": [0, 1], "site": "post_attn"}]


def test_render(tiny_info: dict) -> None:
    console = Console(record=True, width=160)
    console.print(render(tiny_info))
    text = console.export_text()
    for word in ("spatial", "temporal", "bca", "verb", "noun", "total", "multiply-add", "post_attn", "0-1"):
        assert word in text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusionkit")
    add_command(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_info: dict) -> None:
    path = tmp_path / "tiny.yaml"
    OmegaConf.save(OmegaConf.create(TINY), path)
    args = _parser().parse_args(["describe", str(path), "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("params_total", "params_trainable", "gflops", "gflops_torch", "flops_convention", "graph"):
        assert key in out
    assert out["params_total"] == tiny_info["params_total"]
    assert out["gflops"] == pytest.approx(tiny_info["gflops"])

    args = _parser().parse_args(["describe", str(path), "fusion.bca.ratio=0.25", "--json"])
    assert args.overrides == ["fusion.bca.ratio=0.25"]
    args.func(args)
    smaller = json.loads(capsys.readouterr().out)
    assert smaller["params"]["operators"]["bca"]["total"] < out["params"]["operators"]["bca"]["total"]
    assert smaller["gflops"] < out["gflops"]

    args = _parser().parse_args(["describe", str(path)])
    assert args.func(args) == 0
    assert "multiply-add" in capsys.readouterr().out


def test_cast_matches_the_paper() -> None:
    info = describe(RECIPES / "cast.yaml")
    assert info["flops_device"] == "meta"
    assert info["params_total"] / 1e6 == pytest.approx(216.8, abs=0.1)
    assert info["params_trainable"] / 1e6 == pytest.approx(44.8, abs=0.1)
    assert info["gflops"] == pytest.approx(391, rel=0.05)  # paper: 391 GFLOPs (multiply-adds)
    assert info["gflops_torch"] == pytest.approx(2 * info["gflops"])
    assert [r["operator"] for r in info["graph"]] == ["bca"]
    assert info["graph"][0]["steps"] == list(range(12))

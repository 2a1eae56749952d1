"""The scripts in benchmarks/ on recipes/tiny.yaml: their FLOP accounting and tables (no timings asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import breakdown  # noqa: E402
import levers  # noqa: E402

from fusionkit.engine.bench import Workload  # noqa: E402


@pytest.mark.parametrize(("name", "kind"), [
    ("aten::addmm", "matmul"), ("aten.mm", "matmul"), ("aten::convolution_backward", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("aten::copy_", "copies / casts"), ("aten::native_layer_norm", "norms"), ("aten::add", "other"),
    ("aten::gelu", "other"),
])
def test_operators_fall_into_their_kind(name, kind):
    assert breakdown.kind(name) == kind


def test_flops_by_kind_add_up_to_the_bench_count():
    """matmul under SDPA + what eager attention adds = the bench's FlopCounterMode count (eager attention)."""
    torch.manual_seed(0)
    work = Workload.build("tiny")
    flops = breakdown.flops_by_kind(work.run("train_step", "fp32"))
    assert flops["matmul"] > 0 and flops["attention"] > 0
    assert flops["matmul"] + flops["attention"] == pytest.approx(work.flops()["train_step"], rel=1e-9)


def test_breakdown_row_has_every_kind_and_shares_sum_to_100():
    torch.manual_seed(0)
    work = Workload.build("tiny")
    row = breakdown.cells(breakdown.measure_row(work, "forward", "fp32"), peak=100.0)
    assert row[:2] == ["forward", "fp32"] and len(row) == 4 + len(breakdown.KINDS)
    shares = [float(cell.split("%")[0]) for cell in row[4:]]
    assert sum(shares) == pytest.approx(100, abs=len(shares))  # each rounded to a whole percent
    assert "·" in row[4] and "·" in row[5]  # matmul and attention carry their % of peak


def test_levers_overrides_set_frames_only_for_video_recipes():
    assert levers.overrides("cast", 8) == ["inputs.video=[3,8,224,224]", "experts.temporal.num_frames=8"]
    assert levers.overrides("cast", None) == []
    assert levers.overrides("mmvit_i", 8) == []


def test_saved_activations_count_what_each_recompute_mode_keeps():
    """``true`` keeps the steps' inputs; ``keep_attention`` also the fused attention kernels' outputs, which the
    selective checkpoint routes through the saved-tensor hooks around it (torch 2.14's option)."""
    torch.manual_seed(0)
    work = Workload.build("tiny")
    saved = {}
    for mode in (False, True, "keep_attention"):
        work.model.recompute = mode
        saved[mode] = levers.saved_activations_gb(work, "fp32")
    assert saved[True] < saved["keep_attention"] < saved[False]


def test_levers_rejects_an_unknown_configuration():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "levers.py"), "--configs", "fp32,fp64"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown --configs ['fp64']" in out.stderr

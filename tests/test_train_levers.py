"""Issue 10's memory / speed levers: frozen weights stored in bf16 once (``train.frozen_precision``),
activation checkpointing of the experts' steps (``train.recompute_experts``) and ``train.compile``, each
equal to the plain path."""

from __future__ import annotations

import collections
import platform
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusionkit
from fusionkit.attention import fused_kernel_ops
from fusionkit.engine.checkpoint import load_weights
from fusionkit.engine.device import autocast, cast_frozen
from fusionkit.engine.trainer import train
from fusionkit.recipes import RecipeError

BATCH = {"video": torch.randn(2, 3, 4, 32, 32), "audio": torch.randn(2, 1600)}


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = fusionkit.build("tiny")
    with torch.no_grad():  # zero-initialised up-projections would hide the operators and adapters
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    return model


def loss_and_grads(model: torch.nn.Module, precision: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)  # the same drop-path draws
    model.zero_grad(set_to_none=True)
    with autocast(torch.device("cpu"), precision):
        out = model(BATCH)
    loss = sum(v.float().square().mean() for v in out.values())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_frozen_weights_cast_once_give_what_autocast_gives():
    plain, cast = tiny().train(), tiny().train()
    n = cast_frozen(cast, "bf16")
    frozen_linear = cast.experts.temporal.layers[0].attn.qkv.weight
    assert n > 0 and frozen_linear.dtype == torch.bfloat16 and not frozen_linear.requires_grad
    assert cast.experts.temporal.layers[0].norm1.weight.dtype == torch.float32            # norms stay fp32
    assert all(p.dtype == torch.float32 for p in cast.parameters() if p.requires_grad)    # trainable fp32
    assert cast_frozen(tiny(), "fp32") == 0
    loss_a, grads_a = loss_and_grads(plain, "bf16")
    loss_b, grads_b = loss_and_grads(cast, "bf16")
    assert torch.equal(loss_a, loss_b)  # autocast rounds an fp32 weight to the same bf16 value
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


@pytest.mark.parametrize("mode", [True, "keep_attention"])
def test_recomputed_expert_steps_give_the_same_gradients(monkeypatch, mode):
    plain, recompute = tiny().train(), tiny().train()
    recompute.recompute = mode
    loss_a, grads_a = loss_and_grads(plain, "fp32")
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    loss_b, grads_b = loss_and_grads(recompute, "fp32")
    assert len(calls) == 2 * 2 * 2  # two experts x two layers x (attention step, MLP step)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=0, atol=1e-7)


class OpCounter(TorchDispatchMode):
    """Counts the calls of every op below autograd (forward, recomputation and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.calls[func] += 1
        return func(*args, **(kwargs or {}))


def op_calls(recompute: bool | str) -> collections.Counter:
    model = tiny().train()
    model.recompute = recompute
    with OpCounter() as counter:
        loss_and_grads(model, "fp32")
    return counter.calls


def test_recompute_keep_attention_keeps_the_fused_attention_outputs():
    plain, full, kept = op_calls(False), op_calls(True), op_calls("keep_attention")
    fused = [op for op in fused_kernel_ops() if plain[op]]
    assert len(fused) == 1  # SDPA's CPU flash kernel ran (fp32, autograd recording)
    expert_attention_steps = 2 * 2  # two experts x two layers; the operators' attention is not checkpointed
    assert kept[fused[0]] == plain[fused[0]]
    assert full[fused[0]] == plain[fused[0]] + expert_attention_steps
    addmm = torch.ops.aten.addmm.default  # the experts' frozen Linear layers are recomputed either way
    assert full[addmm] >= kept[addmm] > plain[addmm]


@pytest.mark.parametrize("overrides, message", [
    (["train.frozen_precision=bf16"], "'train.frozen_precision' is 'bf16' but train.precision is 'fp32'"),
    (["train.frozen_precision=bf16", "train.precision=bf16", "eval.precision=fp32"],
     "'eval.precision' is 'fp32' but train.frozen_precision is 'bf16'"),
    (["train.recompute_experts=maybe"], "'train.recompute_experts' must be true, false or keep_attention .*, got 'maybe'"),
])
def test_inconsistent_settings_are_one_error(tmp_path, overrides, message):
    with pytest.raises(RecipeError, match=message):
        train("tiny", overrides, output_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("*.safetensors"))


def test_training_with_both_levers_checkpoints_an_fp32_loadable_model(tmp_path):
    result = train("tiny", ["train.precision=bf16", "train.frozen_precision=bf16", "train.recompute_experts=true",
                            "train.epochs=1"], output_dir=tmp_path / "run", progress=False)
    assert result.status == "finished" and all(torch.isfinite(torch.tensor(result.losses)))
    torch.manual_seed(0)
    fresh = fusionkit.build("tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a frozen-fingerprint mismatch would warn
        load_weights(fresh, result.checkpoint)


@pytest.mark.slow
def test_compiled_training_matches_eager_and_logs_the_compile_step(tmp_path):
    common = ["train.epochs=1", "train.log_every=1", "data.train.size=16", "train.batch_size=8", "train.eval_every=0"]
    eager = train("tiny", common, output_dir=tmp_path / "eager", progress=False)
    compiled = train("tiny", [*common, "train.compile=true"], output_dir=tmp_path / "compiled", progress=False)
    assert compiled.status == "finished" and len(compiled.losses) == len(eager.losses) == 2
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)  # inductor may reorder float sums
    assert "torch.compile: first step" in (tmp_path / "compiled" / "train.log").read_text()


HEAP_PROBE = """
import resource, torch
from fusionkit.engine.device import pick_device

def faults() -> int:  # a 64 MiB tensor allocated, written and freed at each step, as activations are
    counts = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(1 << 26, dtype=torch.uint8)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(counts[1:])

plain = faults()
pick_device("cpu")
print(plain, faults())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_cpu_heap sets glibc's malloc")
def test_the_engine_cpu_device_reuses_heap_pages_for_large_tensors():
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, check=True)
    plain, engine = map(int, out.stdout.split()[-2:])
    # glibc maps a block this large afresh at every allocation: 16384 faults of 4 KiB pages, at least 32 where
    # transparent huge pages are always on; after pick_device("cpu") it is served from the heap, its pages kept
    assert plain >= 16
    assert engine < 8


def test_fusionkit_cpu_heap_system_leaves_glibc_alone(monkeypatch):
    from fusionkit.engine.device import keep_cpu_heap

    monkeypatch.setenv("FUSIONKIT_CPU_HEAP", "system")
    assert keep_cpu_heap.__wrapped__() is False  # the uncached function: returns before any mallopt call

"""Train-step time and memory of the precision / memory levers of ``fusionkit train``, on one recipe.

    .venv/bin/python benchmarks/levers.py [--recipe cast[,cava,...]] [--frames 8] [--batch 1] [--reps 2]
                                          [--configs "fp32,fp32 + recompute"] [--out docs/benchmarks.md]

Several recipes (comma-separated) go into one table with a recipe column; ``--frames`` sets the video
length of recipes with a ``video`` input (default: each recipe's own). Each configuration runs in its own process (a fresh allocator, so the peak RSS is its own): build
the recipe with random weights (:class:`fusionkit.engine.bench.Workload`, ``frames`` frames of the
recipe's video size), apply the levers as ``fusionkit train`` does (``train.frozen_precision``:
:func:`fusionkit.engine.device.cast_frozen`; ``train.recompute_experts``: ``model.recompute``), then
time ``--reps`` train steps (forward, loss, backward, AdamW) after one warm-up. Memory, two ways:
what autograd keeps for the backward of one forward (:func:`saved_activations_gb`: exact, the
activation memory the levers act on), and the growth of the process's peak RSS over its RSS after
building (also gradients, optimizer state and the allocator's slack). Ratios within one run only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from report import device_label, markdown_table, write_section

from fusionkit.engine.bench import Workload, _max_rss, _reset_peak, head_loss, measure
from fusionkit.engine.device import autocast, cast_frozen
from fusionkit.recipes import load_recipe

CONFIGS = {  # name -> (precision, frozen_precision, recompute_experts)
    "fp32": ("fp32", None, False),
    "fp32 + recompute": ("fp32", None, True),
    "fp32 + recompute keep_attention": ("fp32", None, "keep_attention"),
    "bf16 autocast": ("bf16", None, False),
    "bf16 + frozen bf16": ("bf16", "bf16", False),
    "bf16 + frozen bf16 + recompute": ("bf16", "bf16", True),
    "bf16 + frozen bf16 + recompute keep_attention": ("bf16", "bf16", "keep_attention"),
}


def overrides(recipe: str, frames: int | None) -> list[str]:
    """``frames`` frames of the recipe's video size (its VideoMAE experts' ``num_frames`` with them); none
    when ``frames`` is None or the recipe has no ``video`` input."""
    cfg = load_recipe(recipe)
    if frames is None or "video" not in cfg["inputs"]:
        return []
    c, _, h, w = cfg["inputs"]["video"]
    return [f"inputs.video=[{c},{frames},{h},{w}]"] + [f"experts.{e}.num_frames={frames}" for e, spec in
                                                       cfg["experts"].items() if spec and spec.get("type") == "videomae_vit"]


def saved_activations_gb(work: Workload, precision: str) -> float:
    """GB of the tensors autograd keeps for the backward of one train-mode forward (parameters left out,
    each storage once): activations, and autocast's low-precision weight copies. Inside checkpointed steps
    the checkpoint's own hooks take over: what it keeps is counted (the steps' inputs, and with
    ``train.recompute_experts: keep_attention`` the fused attention kernels' outputs, which the graph routes
    through these hooks)."""
    params = {p.untyped_storage().data_ptr() for p in work.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    work.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(work.device, precision):
        loss = head_loss(work.model(work.inputs), work.labels)
    loss.backward()
    work.optimizer.zero_grad(set_to_none=True)
    return sum(seen.values()) / 1e9


def one(recipe: str, frames: int | None, batch: int, reps: int, name: str) -> dict[str, float]:
    """Measure configuration ``name`` in this process."""
    precision, frozen, recompute = CONFIGS[name]
    work = Workload.build(recipe, overrides(recipe, frames), batch)
    cast_frozen(work.model, frozen or "fp32")
    work.model.recompute = recompute
    _reset_peak(work.device)
    after_build = _max_rss()
    seconds, _ = measure(work.run("train_step", precision), reps, work.device)
    memory, rss = max(_max_rss() - after_build, 0) / 1e9, _max_rss() / 1e9
    return {"seconds": seconds, "memory_gb": memory, "rss_gb": rss, "saved_gb": saved_activations_gb(work, precision)}


def measure_all(recipe: str, frames: int | None, batch: int, reps: int, configs: list[str]) -> dict[str, dict]:
    """Every configuration of ``configs`` on ``recipe``, each in its own child process."""
    rows = {}
    for name in configs:
        cmd = [sys.executable, __file__, "--one", name, "--recipe", recipe, "--batch", str(batch), "--reps", str(reps)]
        out = subprocess.run(cmd + (["--frames", str(frames)] if frames else []), capture_output=True, text=True,
                             check=True)
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(recipe, name, rows[name], file=sys.stderr, flush=True)
    return rows


def table(recipes: list[str], frames: int | None, batch: int, reps: int, configs: list[str]) -> tuple[str, float]:
    """The markdown table (ratios against each recipe's first configuration) and the seconds it took."""
    cells, t0 = [], time.perf_counter()
    for recipe in recipes:
        rows = measure_all(recipe, frames, batch, reps, configs)
        base = rows[configs[0]]
        for name, r in rows.items():
            cells.append([recipe] * (len(recipes) > 1) + [
                name, f"{r['seconds']:.2f}", f"{base['seconds'] / r['seconds']:.2f}×", f"{r['saved_gb']:.3f}",
                f"{r['saved_gb'] / max(base['saved_gb'], 1e-9):.2f}", f"{r['memory_gb']:.2f}",
                f"{r['memory_gb'] / max(base['memory_gb'], 1e-9):.2f}", f"{r['rss_gb']:.2f}"])
    first = configs[0]
    header = ["recipe"] * (len(recipes) > 1) + ["levers", "train step s", f"vs {first}", "saved for backward GB",
                                               f"vs {first}", "step memory GB", f"vs {first}", "peak RSS GB"]
    return markdown_table(header, cells), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="cast")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from: " + ", ".join(CONFIGS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process of one configuration
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.recipe, args.frames, args.batch, args.reps, args.one)))
        return
    recipes, configs = args.recipe.split(","), args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {unknown}; known: {list(CONFIGS)}")
    body, seconds = table(recipes, args.frames, args.batch, args.reps, configs)
    device = device_label(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    size = f"{args.frames} frames" if args.frames else "each recipe's inputs"
    heading = f"## Memory and precision levers: {', '.join(recipes)} train step ({size}, batch {args.batch}) on {device}"
    command = f"benchmarks/levers.py --recipe {args.recipe}" + (f" --frames {args.frames}" if args.frames else "")
    command += f" --batch {args.batch} --reps {args.reps}" + (f' --configs "{args.configs}"' if configs != list(CONFIGS) else "")
    text = (f"{heading}\n\n`{command}`, {torch.get_num_threads()} threads, torch {torch.__version__}; one process per "
            f"row, median of {args.reps} train steps after a warm-up; step memory: growth of the peak RSS over the "
            f"built model's; {seconds:.0f} s in all.\n\n{body}\n")
    print(text)
    if args.out:
        write_section(args.out, heading, text)


if __name__ == "__main__":
    main()

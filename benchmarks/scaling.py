"""How a recipe's forward grows with the clip length and the batch, with and without its fusion.

    .venv/bin/python benchmarks/scaling.py [--recipes cast ca2st] [--reps 2] [--out docs/benchmarks.md]

For each recipe, each (frames, batch) of :data:`CONFIGS` and each precision (fp32, bf16 autocast),
times one forward (eval mode, no gradients, the ``auto`` attention backend) of the model as the
recipe builds it and of the same model without its operators (``fusion.<op>=null``): the
difference is what the fusion costs, so the table shows how B-CA's windowed cross-attention
grows with T next to the experts'. Frames change ``inputs.video`` and the video expert's
``num_frames`` (the image expert takes every second frame, as in the recipe). The median of
``--reps`` runs after one warm-up, through :class:`fusionkit.engine.bench.Workload`; ratios within
one run only. Writes its section of the markdown file (``--out``).
"""

from __future__ import annotations

import argparse
import time

import torch
from report import device_label, markdown_table, write_section

from fusionkit.engine.bench import Workload, measure
from fusionkit.recipes import load_recipe

CONFIGS = [(8, 1), (16, 1), (32, 1), (16, 2), (16, 4)]  # (frames, batch)


def overrides(recipe: str, frames: int, fused: bool) -> list[str]:
    """Dotlist overrides for ``frames`` frames of the recipe's video size, its operators removed unless ``fused``."""
    cfg = load_recipe(recipe)
    c, _, h, w = cfg["inputs"]["video"]
    out = [f"inputs.video=[{c},{frames},{h},{w}]"]
    out += [f"experts.{e}.num_frames={frames}" for e, spec in cfg["experts"].items()
            if spec and spec.get("type") == "videomae_vit"]
    return out if fused else out + [f"fusion.{op}=null" for op in cfg.get("fusion") or {}]


def forward_seconds(recipe: str, frames: int, batch: int, fused: bool, reps: int) -> dict[str, float]:
    """Precision → median seconds of one forward."""
    work = Workload.build(recipe, overrides(recipe, frames, fused), batch)
    out = {p: measure(work.run("forward", p), reps, work.device)[0] for p in ("fp32", "bf16")}
    del work
    return out


def table(recipe: str, reps: int) -> str:
    rows = []
    for frames, batch in CONFIGS:
        fused = forward_seconds(recipe, frames, batch, True, reps)
        alone = forward_seconds(recipe, frames, batch, False, reps)
        cells = [str(frames), str(batch)]
        for p in ("fp32", "bf16"):
            cells += [f"{fused[p]:.2f}", f"{alone[p]:.2f}", f"{(fused[p] - alone[p]) / fused[p]:.0%}"]
        rows.append(cells)
        print(recipe, cells, flush=True)
    header = ["frames", "batch", "fp32 s", "experts only s", "fusion share", "bf16 s", "experts only s",
              "fusion share"]
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["cast", "ca2st"])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cpu")
    started = time.perf_counter()
    parts = [f"### {r}\n\n{table(r, args.reps)}" for r in args.recipes]
    note = (f"`benchmarks/scaling.py --reps {args.reps}` on {device_label(device)}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}; forward only (eval, no gradients, backend `auto`), median of {args.reps} "
            f"after a warm-up; \"experts only\" is the same model with its operators removed; {time.perf_counter() - started:.0f} s "
            "in all.")
    heading = f"## Scaling with frames and batch on {device_label(device)}"
    section = "\n\n".join([heading, note, *parts]) + "\n"
    print(section)
    if args.out:
        write_section(args.out, heading, section)


if __name__ == "__main__":
    main()

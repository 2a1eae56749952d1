"""What ``torch.compile`` buys a recipe's train step, and what its compilation costs, in one process.

    .venv/bin/python benchmarks/compile.py [--recipe cast] [--frames 8] [--precision bf16] [--reps 3] [--out docs/benchmarks.md]

Builds the recipe with random weights (:class:`fusionkit.engine.bench.Workload`, ``frames`` frames of its
video size), times ``--reps`` eager train steps after a warm-up, then compiles the model
(``torch.compile``, default inductor) as ``train.compile`` does, times the first compiled step
(compilation included) and ``--reps`` more. Ratios within one run only.
"""

from __future__ import annotations

import argparse
import time

import torch
from levers import overrides
from report import device_label, markdown_table, write_section

from fusionkit.engine.bench import Workload, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="cast")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Workload.build(args.recipe, overrides(args.recipe, args.frames), 1)
    eager, _ = measure(work.run("train_step", args.precision), args.reps, work.device)
    work.model = torch.compile(work.model)
    step = work.run("train_step", args.precision)
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    compiled, _ = measure(step, args.reps, work.device)
    rows = [["eager", f"{eager:.2f}", "1.00×"], ["compiled", f"{compiled:.2f}", f"{eager / compiled:.2f}×"],
            ["first compiled step (compilation)", f"{first:.1f}", "-"]]
    heading = f"## torch.compile: {args.recipe} train step on {device_label(work.device)}"
    text = (f"{heading}\n\n`benchmarks/compile.py --recipe {args.recipe} --frames {args.frames} --precision "
            f"{args.precision} --reps {args.reps}`, batch 1, {torch.get_num_threads()} threads, torch "
            f"{torch.__version__}; median of {args.reps} steps after a warm-up.\n\n"
            + markdown_table(["train step", "s", "vs eager"], rows) + "\n")
    print(text)
    if args.out:
        write_section(args.out, heading, text)


if __name__ == "__main__":
    main()

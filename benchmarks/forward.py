"""Whole-model forward benchmark: a recipe in fp32 vs bf16 autocast, per attention backend, one run.

    .venv/bin/python benchmarks/forward.py [RECIPE] [--batch 1] [--reps 3] [--out docs/benchmarks.md]

Builds the recipe (random weights), feeds zeros of its ``inputs`` shapes and reports the median
forward time and the speed-up against fp32 / sdpa measured in the same run, then writes the table
into the markdown file under a heading for the recipe and device.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from report import device_label, markdown_table, write_section

import fusionkit
from fusionkit.attention import use_backend, xformers_available


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="cast")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = fusionkit.build(args.recipe).eval().to(device)
    batch = {k: torch.zeros(args.batch, *s, device=device) for k, s in model.input_shapes.items()}
    backends = ["sdpa", "eager"] + (["xformers"] if xformers_available(device, torch.bfloat16) else [])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows, base = [], None
    for dtype in ("fp32", "bf16"):
        for backend in backends:
            amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
            times = []
            with use_backend(backend), torch.no_grad(), amp:
                for i in range(args.reps + 1):
                    start = time.perf_counter()
                    model(batch)
                    sync()
                    if i:  # the first run warms up
                        times.append(time.perf_counter() - start)
            ms = 1e3 * statistics.median(times)
            base = base or ms
            rows.append((dtype, backend, ms, base / ms))
            print(f"{args.recipe} {dtype:5s} {backend:9s} {ms:9.1f} ms  x{base / ms:5.2f}")
    label = device_label(device)
    heading = f"## {args.recipe} forward on {label}"
    table = markdown_table(["precision", "attention", "ms per batch (median)", "speed-up vs fp32 sdpa"],
                           [[d, b, f"{ms:.0f}", f"{r:.2f}×"] for d, b, ms, r in rows])
    section = (f"{heading}\n\nbatch {args.batch}, inputs {dict(model.input_shapes)}, median of {args.reps} runs "
               f"after one warm-up; `python benchmarks/forward.py {args.recipe}`\n\n" + table + "\n")
    out = write_section(args.out, heading, section)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Where a recipe's forward and train step spend their time, by kind of work (torch.profiler).

    .venv/bin/python benchmarks/breakdown.py [--recipe cast] [--frames 16] [--batch 1] [--precision fp32,bf16]
                                           [--frozen] [--out docs/benchmarks.md]

One process builds the recipe with random weights (:class:`fusionkit.engine.bench.Workload`), runs each
(mode, precision) once as a warm-up and once under ``torch.profiler``, and sums the operators' own CPU
time into kinds: matrix products (``addmm`` / ``mm`` / ``bmm`` / convolutions), the attention kernel
(SDPA's, forward and backward), copies and casts, norms, and the rest (element-wise: residual adds,
GELU, scales, reductions, the optimizer). The FLOPs of the matrix products and of attention are counted
by :class:`~torch.utils.flop_counter.FlopCounterMode` over the same step (multiply-add = 2), so each
of these two kinds gets its achieved GFLOP/s next to the 2048² matmul peak measured in the same run.
``--frozen`` stores frozen weights in bf16 for the bf16 rows (``train.frozen_precision``). Shares
are of one run; the profiler adds a few percent of overhead, spread over all kinds.
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable
from typing import Any

import torch
from levers import overrides
from report import device_label, markdown_table, write_section
from torch.profiler import ProfilerActivity, profile

from fusionkit.attention.kernels import use_backend
from fusionkit.engine.bench import Workload, flop_counter, matmul_peak
from fusionkit.engine.device import DTYPES, cast_frozen

KINDS = ("matmul", "attention", "copies / casts", "norms", "other")
OPS = {  # profiler / FlopCounterMode operator name (without the namespace) -> kind; attention kernels by prefix
    **dict.fromkeys(("addmm", "mm", "bmm", "baddbmm", "convolution", "mkldnn_convolution", "convolution_backward"),
                    "matmul"),
    **dict.fromkeys(("copy_", "_to_copy", "clone", "index", "index_add_", "cat", "gather", "scatter_add_"),
                    "copies / casts"),
    **dict.fromkeys(("native_layer_norm", "native_layer_norm_backward"), "norms"),
}
ATTENTION = ("_scaled_dot_product", "_flash_attention", "_efficient_attention")


def kind(name: str) -> str:
    """The kind of operator ``name`` (``aten::addmm`` or ``aten.addmm`` → ``matmul``)."""
    op = name.replace("::", ".").split(".")[-1]
    return "attention" if op.startswith(ATTENTION) else OPS.get(op, "other")


def counted(step: Callable[[], None]) -> dict[str, float]:
    """FLOPs of one ``step()`` per kind, as FlopCounterMode counts them."""
    with flop_counter() as counter:
        step()
    out: dict[str, float] = collections.defaultdict(float)
    for op, n in counter.get_flop_counts()["Global"].items():
        out[kind(str(op))] += n
    return out


def flops_by_kind(step: Callable[[], None]) -> dict[str, float]:
    """FLOPs of ``step()``: ``matmul`` counted under the recipe's attention backend, ``attention`` what the
    eager backend's matrix products add to that (the CPU SDPA kernel's backward has no FLOP formula)."""
    matmul = counted(step)["matmul"]
    with use_backend("eager"):
        total = sum(counted(step).values())
    return {"matmul": matmul, "attention": total - matmul}


def seconds_by_kind(step: Callable[[], None]) -> tuple[dict[str, float], float]:
    """Own CPU seconds per kind of one profiled ``step()``, and its wall-clock seconds."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    out: dict[str, float] = collections.defaultdict(float)
    for event in prof.key_averages():
        out[kind(event.key)] += event.self_cpu_time_total / 1e6
    return out, wall


def measure_row(work: Workload, mode: str, precision: str) -> dict[str, Any]:
    """One profiled step of (``mode``, ``precision``) after a warm-up: its wall seconds, the operators'
    own seconds per kind and the FLOPs per kind."""
    step = work.run(mode, precision)
    step()
    seconds, wall = seconds_by_kind(step)
    return {"mode": mode, "precision": precision, "wall": wall, "seconds": seconds, "flops": flops_by_kind(step)}


def cells(row: dict[str, Any], peak: float) -> list[str]:
    """The table row: wall seconds, % of ``peak`` (GFLOP/s), and per kind its share of the operators' time
    (with the % of peak it reaches, for the kinds whose FLOPs are counted)."""
    seconds, flops = row["seconds"], row["flops"]
    total = sum(seconds.values())
    out = [row["mode"], row["precision"], f"{row['wall']:.2f}", f"{100 * sum(flops.values()) / row['wall'] / 1e9 / peak:.0f}%"]
    for k in KINDS:
        share = f"{100 * seconds.get(k, 0.0) / total:.0f}%"
        if flops.get(k) and seconds.get(k):
            share += f" · {100 * flops[k] / seconds[k] / 1e9 / peak:.0f}%"
        out.append(share)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="cast")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", default="fp32,bf16")
    parser.add_argument("--frozen", action="store_true", help="frozen weights stored in bf16 for the bf16 rows")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Workload.build(args.recipe, overrides(args.recipe, args.frames), args.batch)
    table, peaks = [], {}
    for precision in args.precision.split(","):
        if args.frozen and precision != "fp32":
            cast_frozen(work.model, precision)
        dtype = DTYPES[precision] or torch.float32
        before = matmul_peak(work.device, dtype, 5)
        measured = [measure_row(work, mode, precision) for mode in ("forward", "train_step")]
        peaks[precision] = max(before, matmul_peak(work.device, dtype, 5))  # this machine's speed varies
        table += [cells(row, peaks[precision]) for row in measured]
    device = device_label(work.device)
    heading = f"## Where the time goes: {args.recipe} on {device}"
    command = f"benchmarks/breakdown.py --recipe {args.recipe} --batch {args.batch}"
    command += (f" --frames {args.frames}" if args.frames else "") + (" --frozen" if args.frozen else "")
    shapes = {k: list(v.shape[1:]) for k, v in work.inputs.items()}
    peak_text = ", ".join(f"{p} {g:.0f}" for p, g in peaks.items())
    text = (f"{heading}\n\n`{command}`, inputs {shapes}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
            f"one profiled step after a warm-up (s: its wall time; % of peak: all its FLOPs over that time); per kind "
            f"its share of the operators' own CPU time, and for matmul and attention `share · % of peak` (FLOPs "
            f"from FlopCounterMode over the same step); 2048² matmul peak (GFLOP/s): "
            f"{peak_text} (the higher of one measurement before and one after the rows).\n\n"
            + markdown_table(["mode", "precision", "s", "% of peak", *KINDS], table) + "\n")
    print(text)
    if args.out:
        write_section(args.out, heading, text)


if __name__ == "__main__":
    main()

"""Attention kernel benchmark: backends × dtypes on CAST's window shapes, ratios within one run.

    .venv/bin/python benchmarks/attention.py [--batch 2] [--reps 5] [--train] [--out docs/benchmarks.md]

Times ``fusionkit.attention.attention`` (the one entry point) for each backend available on the
device (eager, sdpa; xformers on CUDA) and each dtype (fp32, bf16; fp16 on CUDA) on the shapes a CAST
forward runs: VideoMAE's joint space-time attention (1568 tokens), CLIP's per-frame attention (197),
B-CA's T2S time windows (B·196 sequences of 8) and S2T space windows (B·8 × 196). Reports the median
of ``--reps`` runs after a warm-up and the speed-up against eager fp32 in the same run; writes the
table into the markdown file under a heading for the device. ``--train`` times forward and backward
(inputs that require gradients, a random output gradient) instead, with ``auto`` as one more backend:
what the default picks per call while training.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import device_label, markdown_table, write_section

from fusionkit.attention import attention, use_backend, xformers_available

# name: (sequences per sample, tokens, heads, head dim)
SHAPES = {
    "VideoMAE joint space-time (1568 tokens)": (1, 1568, 12, 64),
    "CLIP per frame (8 × 197 tokens)": (8, 197, 12, 64),
    "B-CA T2S time windows (196 × 8 tokens)": (196, 8, 12, 32),
    "B-CA S2T space windows (8 × 196 tokens)": (8, 196, 12, 32),
}


def timed(fn, reps: int, sync) -> float:  # noqa: ANN001
    fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--train", action="store_true", help="forward + backward instead of forward only")
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    backends = ["eager", "sdpa"] + (["xformers"] if xformers_available(device, torch.float16) else [])
    backends += ["auto"] * args.train
    label = device_label(device)
    rows = []
    for name, (groups, tokens, heads, dim) in SHAPES.items():
        base = None
        for dtype in dtypes:
            shape = (args.batch * groups, heads, tokens, dim)
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=args.train) for _ in range(3))
            grad = torch.randn(shape, device=device, dtype=dtype)
            step = (lambda: attention(q, k, v).backward(grad)) if args.train else (lambda: attention(q, k, v))  # noqa: B023
            for backend in backends:
                with use_backend(backend), torch.set_grad_enabled(args.train):
                    ms = timed(step, args.reps, sync)
                base = base or ms
                rows.append((name, backend, str(dtype).removeprefix("torch."), ms, base / ms))
                print(f"{name:45s} {backend:9s} {rows[-1][2]:9s} {ms:9.2f} ms  x{base / ms:5.2f}")
    table = markdown_table(["shape", "backend", "dtype", "ms (median)", "speed-up vs eager fp32"],
                           [[n, b, d, f"{ms:.2f}", f"{r:.2f}×"] for n, b, d, ms, r in rows])
    heading = f"## Attention kernels{', forward and backward (training),' * args.train} on {label}"
    section = (f"{heading}\n\nbatch {args.batch}, median of {args.reps} runs, torch "
               f"{torch.__version__}; `python benchmarks/attention.py{' --train' * args.train}`\n\n" + table + "\n")
    out = write_section(args.out, heading, section)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

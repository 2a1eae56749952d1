"""``fusionkit bench RECIPE``: forward and training-step speed of a recipe, per precision and attention backend.

    fusionkit bench RECIPE [key=value ...] [--batch 1] [--reps 3] [--json] [--out docs/benchmarks.md]

One run builds the recipe with random weights on the device of its ``train.device`` (``auto``: CUDA
if available), feeds one standard-normal batch of ``model.input_shapes`` and measures every
combination of

* mode: ``forward`` (eval mode, ``torch.no_grad``) and ``train_step`` (train mode: forward, loss =
  sum over the heads of the cross-entropy against random labels, backward, one AdamW step built by
  :func:`fusionkit.engine.optim.build_optimizer`, i.e. over exactly the parameters ``fusionkit
  train`` trains);
* precision: ``fp32`` and ``bf16`` (``torch.autocast`` on the device);
* attention backend (:func:`fusionkit.attention.use_backend`): ``sdpa``, ``eager``, and ``xformers``
  where it has a kernel for the device and dtype (CUDA).

Then, with the fastest backend of each, the train levers (``levers`` column): ``train.recompute_experts``
``true`` (``recompute``) and ``keep_attention`` (train step, fp32 and bf16) and ``train.frozen_precision:
bf16`` (forward and train step, with and without recompute; measured last, since the cast is not undone).

Each row holds the median seconds of ``--reps`` runs after one warm-up, the peak memory (of the
warm-up), the achieved GFLOP/s, its fraction of the GFLOP/s of a 2048² matmul in the same precision
measured in the same run (its fastest call, the higher of before and after the rows), and the
speed-up over the eager fp32 row of the same mode (the in-run baseline). The backends of one mode
and precision are timed round-robin (one call of each per round), so that a busy machine's
drift does not decide which backend wins. The ``page faults`` column is the median number of minor
page faults of the process per timed call: fresh pages the allocator had to map, near 0 once the
heap holds a step's tensors (below).

FLOPs count a multiply-add as 2 (torch's convention, as the matmul peak does): the forward's are
``gflops_torch`` of :func:`fusionkit.describe.describe` (per view) × batch; the train step's are counted
by :class:`~torch.utils.flop_counter.FlopCounterMode` over one real forward + backward with eager
attention (so attention's backward is counted too). Frozen experts compute input gradients only,
so a train step is 2–3× a forward, not a fixed 3×.

On CPU the workload's device comes from :func:`~fusionkit.engine.device.pick_device`, which keeps large
tensors on the heap (:func:`~fusionkit.engine.device.keep_cpu_heap`), as in ``fusionkit train``: without
it, which earlier rows had left free blocks on the heap decided whether eager attention on VideoMAE's
1568 keys faulted in ~700k fresh pages per bf16 train step or none (1.5× in its time).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (weights, activations, gradients,
optimizer state); on CPU the growth of the process's peak RSS (``resource.getrusage``) over its RSS
before the measurement, the peak being reset through ``/proc/self/clear_refs`` on Linux. Memory
that the CPU allocator kept from an earlier row is not counted again, so CPU rows compare loosely.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionkit.attention import use_backend, xformers_available
from fusionkit.describe import describe, flop_counter
from fusionkit.engine.commands import recipe_parser
from fusionkit.engine.config import train_config
from fusionkit.engine.device import autocast, cast_frozen, pick_device
from fusionkit.engine.optim import build_optimizer
from fusionkit.errors import UsageError
from fusionkit.recipes import RecipeError, build_from_config, load_recipe

MODES = ("forward", "train_step")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
BASELINE = ("fp32", "eager")  # (precision, backend) of the speed-up column
PEAK_SIZE = 2048              # side of the square matmul that measures the device's peak
HEADER = ("# Benchmarks\n\nTimings are compared only within one run (ratios in the last column); `fusionkit bench` and\n"
          "the scripts in `benchmarks/` run outside the test suite and rewrite their own section of this file.\n")


# markdown report ---------------------------------------------------------------------------------

def device_label(device: torch.device) -> str:
    """The GPU's name, or the CPU's model (Linux: ``/proc/cpuinfo``; else its architecture) and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({_cpu_model() or platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _cpu_model() -> str | None:
    """The first ``model name`` of ``/proc/cpuinfo`` (e.g. ``AMD EPYC``), None where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: one header row, then ``rows`` (cells already formatted)."""
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(r) + " |" for r in rows)])


def write_section(out: str | Path, heading: str, section: str) -> Path:
    """Put ``section`` (starting with ``heading``) into ``out``, replacing a section of that heading
    (up to the next ``## `` heading) and keeping the others; a new file starts with :data:`HEADER`."""
    out = Path(out)
    text = out.read_text() if out.exists() else HEADER
    if heading in text:
        start = text.index(heading)
        end = text.find("\n## ", start + 1)
        text = text[:start] + section.rstrip("\n") + ("\n\n" + text[end + 1:] if end != -1 else "\n")
    else:
        text = text.rstrip() + "\n\n" + section
    out.write_text(text)
    return out


# measuring ---------------------------------------------------------------------------------------

def backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The attention backends that run on ``device`` for ``dtype``: auto (the default, its per-call rule),
    sdpa, eager, xformers where it has a kernel."""
    return ["auto", "sdpa", "eager"] + (["xformers"] if xformers_available(device, dtype) else [])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_rss() -> int:
    """The process's peak resident set size in bytes."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def _reset_peak(device: torch.device) -> int:
    """Reset the peak-memory counter of ``device``; returns the bytes the peak starts from."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: peak RSS := current RSS
    return _max_rss()


def _peak_gb(device: torch.device, start: int) -> float:
    """GB at the peak since :func:`_reset_peak` returned ``start``."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return max(_max_rss() - start, 0) / 1e9


class Measured(NamedTuple):
    """What :func:`measure_interleaved` gives per function."""

    seconds: float  # median of the timed calls
    peak_gb: float  # peak memory of the warm-up call (see the module docstring)
    page_faults: float  # median minor page faults of the process per timed call (CPU-side, also on CUDA)


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, int]:
    """Seconds and minor page faults of one call of ``fn``, the device synchronised after it."""
    faults, t0 = _minor_faults(), time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0, _minor_faults() - faults


def measure(fn: Callable[[], Any], reps: int, device: torch.device) -> tuple[float, float]:
    """Median seconds of ``reps`` calls of ``fn`` after one warm-up, and the peak memory in GB of the warm-up."""
    seconds, peak, _ = measure_interleaved([fn], reps, device)[0]
    return seconds, peak


def measure_interleaved(fns: Sequence[Callable[[], Any]], reps: int, device: torch.device) -> list[Measured]:
    """Per function of ``fns``: the median seconds and page faults of ``reps`` calls and the peak memory in GB of
    its warm-up call.

    Each function is warmed up (and its peak memory taken) once, then the timed calls go round-robin, one of each
    per round, so that a shared machine's drift (other jobs, clocks) slows every function alike and the ratios
    between them hold."""
    peaks = []
    for fn in fns:
        start = _reset_peak(device)
        fn()
        _sync(device)
        peaks.append(_peak_gb(device, start))
    calls: list[list[tuple[float, int]]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, own in zip(fns, calls):
            own.append(_timed(fn, device))
    return [Measured(statistics.median(t for t, _ in own), peak, statistics.median(f for _, f in own))
            for own, peak in zip(calls, peaks)]


def matmul_peak(device: torch.device, dtype: torch.dtype, reps: int) -> float:
    """GFLOP/s of the fastest of ``max(reps, 3)`` ``(2048, 2048) @ (2048, 2048)`` products in ``dtype`` after one
    warm-up (2 FLOPs per multiply-add): what the hardware allows, so the best call, not the median."""
    a, b = (torch.randn(PEAK_SIZE, PEAK_SIZE, device=device).to(dtype) for _ in range(2))
    _timed(lambda: a @ b, device)
    seconds = min(_timed(lambda: a @ b, device)[0] for _ in range(max(reps, 3)))
    return 2 * PEAK_SIZE ** 3 / seconds / 1e9


def head_loss(logits: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor:
    """Sum over the heads of the cross-entropy of ``logits[h]`` ``(B, classes)`` against ``labels[h]`` ``(B,)``."""
    return sum(F.cross_entropy(logits[h].float(), y) for h, y in labels.items())


@dataclass
class Workload:
    """A built recipe, its optimizer and one random batch: what every measurement runs.

    Attributes:
        model: the recipe's ``FusionModel`` (random weights) on ``device``.
        optimizer: AdamW over the trainable parameters, as ``fusionkit train`` builds it.
        inputs: modality → ``(B, *model.input_shapes[modality])`` standard-normal tensor.
        labels: head name → ``(B,)`` random class indices.
        device: where everything lives.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    inputs: dict[str, Tensor]
    labels: dict[str, Tensor]
    device: torch.device

    @classmethod
    def build(cls, recipe: Any, overrides: Iterable[str] = (), batch: int = 1) -> Workload:
        """Build ``recipe`` (path, name or mapping) with ``overrides`` and a batch of ``batch`` samples."""
        _check_positive("--batch", batch)
        cfg = load_recipe(recipe, overrides)
        train = train_config(cfg)
        device = pick_device(train["device"])
        torch.manual_seed(int(train["seed"]))
        model = build_from_config(cfg).to(device)
        inputs = {k: torch.randn(batch, *s, device=device) for k, s in model.input_shapes.items()}
        labels = {h: torch.randint(head.num_classes, (batch,), device=device) for h, head in model.heads.items()}
        try:
            optimizer = build_optimizer(model, train)
        except ValueError as err:  # nothing trainable: the recipe's mistake, as in `fusionkit train`
            raise RecipeError(str(err)) from err
        return cls(model, optimizer, inputs, labels, device)

    def forward(self, precision: str) -> None:
        """One forward of the batch without gradients (in the model's current mode)."""
        with torch.no_grad(), autocast(self.device, precision):
            self.model(self.inputs)

    def train_step(self, precision: str) -> None:
        """Forward, :func:`head_loss`, backward and one optimizer step (in the model's current mode)."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, precision):
            loss = head_loss(self.model(self.inputs), self.labels)
        loss.backward()
        self.optimizer.step()

    def run(self, mode: str, precision: str) -> Callable[[], None]:
        """``forward`` in eval mode or ``train_step`` in train mode, as a call without arguments."""
        self.model.train(mode == "train_step")
        step = self.forward if mode == "forward" else self.train_step
        return lambda: step(precision)

    def flops(self, precision: str = "fp32") -> dict[str, float]:
        """Torch FLOPs (multiply-add = 2) of a forward and of a train step of the whole batch (counted under
        ``precision``'s autocast: the same count, but it runs once frozen weights are cast)."""
        batch = next(iter(self.inputs.values())).shape[0]
        counter = flop_counter()
        self.model.train()
        with use_backend("eager"), counter:
            with autocast(self.device, precision):
                loss = head_loss(self.model(self.inputs), self.labels)
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, precision):
            forward = describe(self.model)["gflops_torch"] * 1e9 * batch
        return {"forward": forward, "train_step": float(counter.get_total_flops())}


def changed_parameters(work: Workload, steps: int = 2, precision: str = "fp32") -> set[str]:
    """Names of the parameters whose values ``steps`` train steps of ``work`` change.

    Two steps by default: after the first the zero-initialised up-projections are non-zero, so the
    modules before them get gradients in the second. Without weight decay a trainable parameter
    stays unchanged if its gradient is zero: a branch dropped by drop-path, or one the loss does
    not read (the last layer's cross-attention into patch tokens when the head reads the CLS token).
    """
    before = {n: p.detach().clone() for n, p in work.model.named_parameters()}
    step = work.run("train_step", precision)
    for _ in range(steps):
        step()
    return {n for n, p in work.model.named_parameters() if not torch.equal(p.detach(), before[n])}


@dataclass(frozen=True)
class Row:
    """One measured combination."""

    mode: str
    precision: str
    backend: str
    median_s: float
    peak_mem_gb: float
    gflops_per_s: float
    fraction_of_peak: float
    speedup: float = 1.0  # over the eager fp32 row of the same mode
    levers: str = ""  # "" (as built), or the train levers applied: "recompute" [keep_attention], "frozen bf16", both
    page_faults: float = 0.0  # median minor page faults of the process per timed call


def _check_positive(option: str, value: int) -> None:
    if value < 1:
        raise UsageError(f"{option} must be a positive integer, got {value}")


def _setting(work: Workload, mode: str, precision: str, backend: str, levers: str) -> Callable[[], None]:
    """One call of ``mode`` in ``precision`` with ``backend`` forced and the recompute lever of ``levers``."""
    run = work.run(mode, precision)
    recompute = "keep_attention" if "keep_attention" in levers else "recompute" in levers

    def call() -> None:
        work.model.recompute = recompute
        try:
            with use_backend(backend):
                run()
        finally:
            work.model.recompute = False
    return call


def _rows(work: Workload, settings: Sequence[tuple[str, str, str, str]], reps: int,
          status: Callable[[str], None]) -> list[Row]:
    """Rows of ``settings`` ``(mode, precision, backend, levers)``, measured together (:func:`measure_interleaved`),
    their rates not yet filled in (:func:`rated`)."""
    status(", ".join(" ".join(filter(None, s)) for s in settings))
    measured = measure_interleaved([_setting(work, *s) for s in settings], reps, work.device)
    return [Row(mode, precision, backend, m.seconds, m.peak_gb, 0.0, 0.0, levers=levers, page_faults=m.page_faults)
            for (mode, precision, backend, levers), m in zip(settings, measured)]


def rated(rows: Sequence[Row], flops: Mapping[str, float], peaks: Mapping[str, float]) -> list[Row]:
    """``rows`` with GFLOP/s, fraction of the matmul peak and speed-up over the eager fp32 row of their mode."""
    base = {r.mode: r.median_s for r in rows if (r.precision, r.backend, r.levers) == (*BASELINE, "")}
    out = []
    for r in rows:
        rate = flops[r.mode] / r.median_s / 1e9
        out.append(replace(r, gflops_per_s=rate, fraction_of_peak=rate / peaks[r.precision],
                           speedup=base[r.mode] / r.median_s))
    return out


def measure_rows(work: Workload, reps: int, status: Callable[[str], None]) -> list[Row]:
    """Every (mode, precision, backend) of ``work`` as built, the backends of one mode and precision measured
    together; then, with the fastest backend of each, the train levers: ``train.recompute_experts`` ``true`` and
    ``keep_attention`` (train step, fp32 and bf16), and, last (the cast is not undone), ``train.frozen_precision:
    bf16`` (both modes, bf16, with and without recompute); ``status`` hears each group."""
    rows = [row for mode in MODES for precision, dtype in PRECISIONS.items()
            for row in _rows(work, [(mode, precision, b, "") for b in backends(work.device, dtype)], reps, status)]
    fastest = {(r.mode, r.precision): r.backend for r in sorted(rows, key=lambda r: -r.median_s)}
    rows += _rows(work, [("train_step", p, fastest[("train_step", p)], levers) for p in PRECISIONS
                         for levers in ("recompute", "recompute keep_attention")], reps, status)
    cast_frozen(work.model, "bf16")
    rows += _rows(work, [("forward", "bf16", fastest[("forward", "bf16")], "frozen bf16")], reps, status)
    rows += _rows(work, [("train_step", "bf16", fastest[("train_step", "bf16")], levers)
                         for levers in ("frozen bf16", "frozen bf16 + recompute")], reps, status)
    return rows


def best(rows: Sequence[Row], mode: str) -> dict[str, dict[str, Any]]:
    """Precision → the fastest row of ``mode``, its settings (``backend``, ``levers``) included (without mode and
    precision)."""
    out: dict[str, dict[str, Any]] = {}
    for precision in PRECISIONS:
        row = min((r for r in rows if (r.mode, r.precision) == (mode, precision)), key=lambda r: r.median_s)
        out[precision] = {k: v for k, v in asdict(row).items() if k not in ("mode", "precision")}
    return out


def run_bench(recipe: Any, overrides: Iterable[str] = (), batch: int = 1, reps: int = 3,
              status: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Measure a recipe (see the module docstring); a JSON-serialisable dict.

    Keys: ``recipe``, ``device``, ``threads``, ``torch``, ``batch``, ``reps``, ``overrides``, ``input_shapes``,
    ``peak_gflops`` (``fp32``, ``bf16``: the matmul's GFLOP/s), ``gflops`` (``forward``,
    ``train_step``: FLOPs of one batch / 1e9), ``forward`` and ``train_step`` (precision → the
    fastest row's ``median_s``, ``peak_mem_gb``, ``backend``, ``levers``, ``gflops_per_s``,
    ``fraction_of_peak``, ``speedup``) and ``rows`` (every combination, with ``mode`` and ``precision``).
    """
    _check_positive("--reps", reps)
    overrides = list(overrides)
    status("building the model")
    work = Workload.build(recipe, overrides, batch)
    status("matmul peak")
    peaks = {p: matmul_peak(work.device, dtype, reps) for p, dtype in PRECISIONS.items()}
    rows = measure_rows(work, reps, status)
    status("matmul peak again")  # a shared machine's speed drifts: the higher of before and after the rows
    peaks = {p: max(peaks[p], matmul_peak(work.device, dtype, reps)) for p, dtype in PRECISIONS.items()}
    status("counting FLOPs")
    flops = work.flops("bf16")
    rows = rated(rows, flops, peaks)
    name = work.model.recipe.get("name") or str(recipe)
    return {"recipe": name, "device": device_label(work.device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "batch": batch, "reps": reps, "overrides": overrides,
            "input_shapes": {k: list(s) for k, s in work.model.input_shapes.items()},
            "peak_gflops": peaks, "gflops": {m: f / 1e9 for m, f in flops.items()},
            **{m: best(rows, m) for m in MODES}, "rows": [asdict(r) for r in rows]}


# output ------------------------------------------------------------------------------------------

COLUMNS = ("mode", "precision", "attention", "levers", "ms (median)", "peak GB", "page faults", "GFLOP/s",
           "% of peak", "vs eager fp32")


def _cells(row: Mapping[str, Any]) -> list[str]:
    return [row["mode"], row["precision"], row["backend"], row.get("levers") or "-", f"{1e3 * row['median_s']:.2f}",
            f"{row['peak_mem_gb']:.3f}", f"{row.get('page_faults', 0):.0f}", f"{row['gflops_per_s']:.1f}",
            f"{100 * row['fraction_of_peak']:.1f}", f"{row['speedup']:.2f}×"]


def _context(result: Mapping[str, Any]) -> str:
    peaks = result["peak_gflops"]
    return (f"batch {result['batch']}, inputs {result['input_shapes']}, median of {result['reps']} runs after one "
            f"warm-up, torch {result['torch']}, {result['threads']} threads; GFLOPs per batch: forward "
            f"{result['gflops']['forward']:.3g}, train step {result['gflops']['train_step']:.3g} (multiply-add = 2); "
            f"2048² matmul peak (fastest call): fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s (% of peak: of the "
            "row's precision); vs eager fp32: speed-up over the eager fp32 row of the same mode")


def render(result: Mapping[str, Any]) -> Any:
    """A rich table of every row; its caption gives the run's settings, FLOPs and matmul peaks."""
    from rich.table import Table

    table = Table(title=f"{result['recipe']} on {result['device']}", title_justify="left",
                  caption=_context(result), caption_justify="left")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in COLUMNS[:4] else "right", no_wrap=True)
    for row in result["rows"]:
        table.add_row(*_cells(row))
    return table


def markdown_section(result: Mapping[str, Any]) -> tuple[str, str]:
    """The heading (recipe, overrides and device) and the markdown section of ``result``."""
    heading = " ".join(["##", result["recipe"], *result["overrides"], "forward and train step on", result["device"]])
    command = " ".join(["fusionkit bench", result["recipe"], *result["overrides"], f"--batch {result['batch']}",
                        f"--reps {result['reps']}"])
    table = markdown_table(list(COLUMNS), [_cells(r) for r in result["rows"]])
    return heading, f"{heading}\n\n{_context(result)}; `{command}`\n\n{table}\n"


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    status = contextlib.nullcontext() if args.json else Console(stderr=True).status(f"bench {args.recipe}")
    with status as live:
        tell = (lambda text: live.update(f"bench {args.recipe}: {text}")) if live else (lambda _: None)
        result = run_bench(args.recipe, args.overrides, args.batch, args.reps, status=tell)
    out = write_section(args.out, *markdown_section(result)) if args.out else None
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    console = Console()
    console.print(render(result))
    if out is not None:
        console.print(f"wrote {out}")
    return 0


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench RECIPE [overrides ...] [--batch N] [--reps R] [--json] [--out FILE]``."""
    p = recipe_parser(subparsers, "bench", "forward / train-step speed of a recipe per precision and attention backend",
                      "Time a forward and a training step (AdamW over the trainable parameters) of a recipe with "
                      "random weights, in fp32 and bf16, with every attention backend that runs here and the train "
                      "levers; peak memory, GFLOP/s against a matmul peak, and the speed-up over eager fp32, all "
                      "measured in one run.")
    p.add_argument("--batch", type=int, default=1, help="samples per batch (default 1)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per combination after one warm-up (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table (no progress line)")
    p.add_argument("--out", default=None, help="markdown file whose section for this recipe and device is replaced")
    p.set_defaults(func=cmd_bench)
    return p

"""Training curves as PNG: ``curves.png`` at the end of a run, and ``fusionkit plot RUN_DIR [RUN_DIR ...]``.

One figure, one subplot per quantity, against the (fractional) epoch: the training loss (every
logged step as a thin line, each epoch's mean as dots), the learning rate, the gradient norm (when
the run logged steps) and one subplot per validation metric of the epoch rows (``val top1``: a line
per head, ``verb``, ``noun``, ``action``, told apart by line style; not ``num_samples`` /
``skipped``). Several runs are overlaid, one colour each, with a legend of their folder names. The rows come from each run's ``metrics.jsonl`` (:mod:`fusionkit.engine.metrics_file`).
Drawn by matplotlib's Agg canvas directly (no pyplot, no global backend change).

    fusionkit plot runs/tiny                            # -> runs/tiny/curves.png
    fusionkit plot runs/a runs/b --out compare.png      # overlaid; default ./curves.png
"""

from __future__ import annotations

import argparse
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fusionkit.engine.metrics_file import JSONL, epoch_rows, read_rows, step_rows
from fusionkit.errors import UsageError

CURVES = "curves.png"
NOT_PLOTTED = ("num_samples", "skipped")
METRIC_ORDER = ("top1", "top5", "mca", "mAP")
STYLES = ("-", "--", ":", "-.")


def _values(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        x, y = r.get("epoch"), r.get(key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(y):
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys


def load_runs(run_dirs: Sequence[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """``{label: rows}`` of each run folder (label: its name, or the path when names repeat); a folder
    without ``metrics.jsonl`` (or without a row) is a :class:`~fusionkit.errors.UsageError` naming it."""
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise UsageError("fusionkit plot: give at least one run folder")
    names = [p.resolve().name or str(p) for p in paths]
    out: dict[str, list[dict[str, Any]]] = {}
    for path, name in zip(paths, names, strict=True):
        if not path.exists():
            raise UsageError(f"run folder {path} does not exist")
        file = path if path.is_file() and path.suffix == ".jsonl" else path / JSONL
        if not file.is_file():
            raise UsageError(f"{path} has no {JSONL} (not a run folder of fusionkit train)")
        rows = read_rows(file)
        if not rows:
            raise UsageError(f"{file} holds no metrics row yet")
        label = name if names.count(name) == 1 else str(path)
        out[label] = rows
    return out


def panels(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[tuple[str, list[str]]]:
    """The subplots, ``(title, keys)``: ``train/loss``, ``lr``, ``grad_norm`` (if logged), then one per
    validation metric (``val top1``: ``val/verb/top1``, ``val/noun/top1``, ``val/action/top1``, ...)."""
    out = [("train/loss", ["train/loss"]), ("lr", ["lr"])]
    if any("grad_norm" in r for rows in runs.values() for r in step_rows(rows)):
        out.append(("grad_norm", ["grad_norm"]))
    by_metric: dict[str, list[str]] = {}
    for key in sorted({k for rows in runs.values() for r in epoch_rows(rows) for k in r if k.startswith("val/")}):
        metric = key.rsplit("/", 1)[-1]
        if metric not in NOT_PLOTTED:
            by_metric.setdefault(metric, []).append(key)
    order = sorted(by_metric, key=lambda m: (METRIC_ORDER.index(m) if m in METRIC_ORDER else len(METRIC_ORDER), m))
    return out + [(f"val {m}", by_metric[m]) for m in order]


def draw(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> bytes:
    """The PNG of the curves of ``runs`` (``{label: rows}``): colour = run, line style = head (val panels)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    subplots = panels(runs)
    cols = min(3, len(subplots))
    nrows = math.ceil(len(subplots) / cols)
    fig = Figure(figsize=(4.2 * cols, 2.8 * nrows), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    colors = {label: f"C{i % 10}" for i, label in enumerate(runs)}
    for ax, (title, keys) in zip(axes, subplots, strict=False):
        for label, rows in runs.items():
            color, steps, epochs = colors[label], step_rows(rows), epoch_rows(rows)
            if title == "train/loss":
                ax.plot(*_values(steps, title), color=color, linewidth=0.8, alpha=0.5)
                ax.plot(*_values(epochs, title), color=color, marker="o", markersize=3, linewidth=1.2, label=label)
            elif title in ("lr", "grad_norm"):
                source = steps if _values(steps, title)[0] else epochs
                ax.plot(*_values(source, title), color=color, linewidth=1.0)
            else:
                for i, key in enumerate(keys):
                    ax.plot(*_values(epochs, key), color=color, marker="o", markersize=3, linewidth=1.2,
                            linestyle=STYLES[i % len(STYLES)])
        if title.startswith("val "):  # the heads, by line style
            heads = [k[len("val/"):].rsplit("/", 1)[0] for k in keys]
            ax.legend([Line2D([], [], color="0.3", linestyle=STYLES[i % len(STYLES)]) for i in range(len(keys))],
                      heads, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_locator(MaxNLocator(5))
        ax.grid(alpha=0.3)
    for ax in axes[len(subplots):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)  # the runs, by colour
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12 if nrows == 1 else 0.07, top=0.9 if nrows == 1 else 0.94,
                        wspace=0.28, hspace=0.55)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Draw the curves of one or several run folders into ``out`` (default: ``RUN_DIR/curves.png`` for one
    run, ``./curves.png`` for several); returns the file."""
    from fusionkit.engine.checkpoint import atomic_write_bytes

    runs = load_runs(run_dirs)
    target = Path(out) if out is not None else (Path(run_dirs[0]) / CURVES if len(run_dirs) == 1 else Path(CURVES))
    return atomic_write_bytes(target, draw(runs))


def cmd_plot(args: argparse.Namespace) -> int:
    path = plot_runs(args.run_dirs, args.out)
    print(f"wrote {path}")
    return 0


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``plot RUN_DIR [RUN_DIR ...] [--out FILE]`` to an ``add_subparsers()`` object."""
    p = subparsers.add_parser("plot", help="PNG curves (loss, lr, grad norm, validation metrics) of runs",
                              description="Draw the training curves of one or several run folders (their "
                              "metrics.jsonl), overlaid, one colour per run.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by fusionkit train")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="PNG file (default: RUN_DIR/curves.png for one run, ./curves.png for several)")
    p.set_defaults(func=cmd_plot)
    return p

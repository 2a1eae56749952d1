"""The reports of an ablation: a rich table, ``results.json`` / ``results.csv`` / ``results.md`` and ``results.png``.

Input: result rows, one per variant × seed (``variant``, ``seed``, ``operator``, ``params_trainable``,
``gflops``, ``train_s``, ``heads``, ``headline``, ``metrics`` {name: value}). Per variant the table shows
the mean ± standard deviation over seeds (sample std, ``-`` for one seed) of the headline (the mean of
the top-1 of the heads the variant reports) and of every head's top-1.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fusionkit.engine.checkpoint import atomic_write_bytes


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per variant (first-seen order): its rows' static columns and per-metric value lists."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = out.setdefault(row["variant"], {k: row[k] for k in ("variant", "operator", "params_trainable",
                                                                    "gflops")} | {"values": {}, "train_s": []})
        entry["train_s"].append(float(row["train_s"]))
        entry["values"].setdefault("headline", []).append(float(row["headline"]))
        for head in row["heads"]:
            entry["values"].setdefault(f"{head}/top1", []).append(float(row["metrics"][f"{head}/top1"]))
    return list(out.values())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def _cell(values: Sequence[float] | None) -> str:
    """``mean ± std`` of percentages (the metrics' unit), one decimal."""
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.1f}" + ("" if std != std else f" ± {std:.1f}")


def head_columns(summary: Sequence[Mapping[str, Any]]) -> list[str]:
    names = sorted({k for e in summary for k in e["values"] if k != "headline"})
    return names


def table(summary: Sequence[Mapping[str, Any]], title: str) -> Any:
    """A rich table: variant, operator, trainable params, GFLOPs per clip, train s, headline, heads (top-1, %)."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for name, justify in (("variant", "left"), ("operator", "left"), ("trainable", "right"), ("GFLOPs", "right"),
                          ("train s", "right"), ("headline", "right")):
        t.add_column(name, justify=justify, style="bold cyan" if name == "variant" else None, no_wrap=True)
    heads = head_columns(summary)
    for h in heads:
        t.add_column(h, justify="right")
    for e in summary:
        t.add_row(e["variant"], e["operator"], f"{e['params_trainable']:,}", f"{e['gflops']:.3f}",
                  f"{statistics.fmean(e['train_s']):.0f}", _cell(e["values"]["headline"]),
                  *(_cell(e["values"].get(h)) for h in heads))
    return t


def markdown(summary: Sequence[Mapping[str, Any]], title: str) -> str:
    """The table as GitHub markdown (for docs/): the same columns as :func:`table`."""
    heads = head_columns(summary)
    columns = ["variant", "operator", "trainable", "GFLOPs", "train s", "headline", *heads]
    lines = [f"**{title}**", "", "| " + " | ".join(columns) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(columns) - 2)) + "|"]
    for e in summary:
        cells = [e["variant"], e["operator"], f"{e['params_trainable']:,}", f"{e['gflops']:.3f}",
                 f"{statistics.fmean(e['train_s']):.0f}", _cell(e["values"]["headline"]),
                 *(_cell(e["values"].get(h)) for h in heads)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    metric_names = sorted({k for r in rows for k in r["metrics"]})
    columns = ["variant", "seed", "operator", "params_trainable", "gflops", "train_s", "headline", *metric_names]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({**{k: r.get(k) for k in columns[:7]}, **r["metrics"]})
    return buf.getvalue()


def plot(summary: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Bar chart: one panel per metric (headline, then each head's top-1), one bar per variant that
    reports it, error bars = std over seeds, one colour per operator family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["headline", *head_columns(summary)]
    families = sorted({e["operator"] for e in summary})
    colours = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 4.2), squeeze=False)
    for ax, metric in zip(axes[0], panels):
        shown = [e for e in summary if e["values"].get(metric)]
        stats = [mean_std(e["values"][metric]) for e in shown]
        ax.bar(range(len(shown)), [m for m, _ in stats], yerr=[0.0 if s != s else s for _, s in stats], capsize=3,
               color=[colours[e["operator"]] for e in shown])
        ax.set_xticks(range(len(shown)), [e["variant"] for e in shown], rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("top-1 (%)")
        ax.set_title("headline (mean of heads)" if metric == "headline" else metric, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[f]) for f in families]
    fig.legend(handles, families, loc="upper right", fontsize=8, title="operator", title_fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_reports(rows: Sequence[Mapping[str, Any]], directory: Path, name: str, console: Any) -> dict[str, Path]:
    """Print the table and write ``results.json``, ``results.csv``, ``results.md`` (the table in markdown)
    and ``results.png`` into ``directory``."""
    seeds = sorted({r["seed"] for r in rows})
    title = f"Ablation {name}: top-1 (%) on data.test, mean ± std over seeds {seeds}"
    summary = summarise(rows)
    console.print(table(summary, title))
    paths = {name: directory / f"results.{name}" for name in ("json", "csv", "png", "md")}
    atomic_write_bytes(paths["json"], (json.dumps(list(rows), indent=2) + "\n").encode())
    atomic_write_bytes(paths["md"], markdown(summary, title).encode())
    atomic_write_bytes(paths["csv"], _csv(rows).encode())
    plot(summary, paths["png"], title)
    return paths

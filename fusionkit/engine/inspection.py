"""``fusionkit inspect RECIPE --video FILE [--checkpoint C] [--out DIR]``: cross-attention entropy per layer.

One forward of the recipe's model on a clip's test views (decoded as ``fusionkit predict`` does) under
:func:`fusionkit.attention.recording`: every attention call inside a fusion operator is recorded with
its label (``<operator>/<step>`` from the graph, ``/<direction>`` from operators that name one, as
B-CA does), so any operator whose attention goes through the entry point is covered, none re-computed
here. For each direction and step: the mean entropy (nats) of the attention rows (every query of
every window, head and view) and the same divided by the log of the keys the row may attend (1 =
uniform, 0 = one key): the quantity of the CA²ST paper's Fig. 8.

Writes ``DIR/entropy.json`` (``{"file", "checkpoint", "directions": {name: {"steps", "entropy",
"normalised", "keys"}}}``) and ``DIR/entropy.png`` (one line per direction over the steps).
Attention maps overlaid on the frames and the spectrogram are not drawn yet (follow-up in issue 11).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fusionkit.attention import AttentionRecord, recording
from fusionkit.errors import UsageError


def row_entropy(weights: Tensor) -> tuple[Tensor, Tensor]:
    """Entropy (nats) of every attention row of ``weights`` ``(..., Lq, Lk)`` and the log of the keys it
    may attend (non-zero weights), both ``(..., Lq)``."""
    entropy = -torch.special.xlogy(weights, weights).sum(-1)
    allowed = (weights > 0).sum(-1).clamp(min=1).float().log()
    return entropy, allowed


def summarise(records: Sequence[AttentionRecord]) -> dict[str, dict[str, list[float]]]:
    """``{direction: {"steps", "entropy", "normalised", "keys"}}`` from recorded calls labelled
    ``<operator>/<step>[/<direction>]`` (several calls of one label, e.g. ragged windows, pooled)."""
    rows: dict[str, dict[int, list[tuple[Tensor, Tensor]]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        parts = rec.label.split("/")
        if len(parts) < 2 or not parts[1].isdigit():
            continue  # a label the graph did not set
        name = ".".join([parts[0], *parts[2:]])
        rows[name][int(parts[1])].append(row_entropy(rec.weights))
    out = {}
    for name, steps in rows.items():
        entry: dict[str, list[float]] = {"steps": [], "entropy": [], "normalised": [], "keys": []}
        for step in sorted(steps):
            ent = torch.cat([e.reshape(-1) for e, _ in steps[step]])
            logk = torch.cat([k.reshape(-1) for _, k in steps[step]])
            wide = logk > 0
            entry["steps"].append(step)
            entry["entropy"].append(float(ent.mean()))
            entry["normalised"].append(float((ent[wide] / logk[wide]).mean()) if wide.any() else 0.0)
            entry["keys"].append(float(logk.exp().mean()))
        out[name] = entry
    return out


def draw(directions: Mapping[str, Mapping[str, Sequence[float]]], title: str) -> bytes:
    """PNG: normalised entropy per step, one line per direction."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (name, d) in enumerate(directions.items()):
        ax.plot(d["steps"], d["normalised"], marker="o", markersize=3, color=f"C{i % 10}", label=name)
    ax.set(xlabel="graph step (layer)", ylabel="entropy / log(keys)", ylim=(0, 1.05), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def run_inspect(recipe: Any, video: str | Path, checkpoint: str | None = None, overrides: Sequence[str] = (),
                out: str | Path | None = None, device: str = "auto") -> dict[str, Any]:
    """Record the operators' attention on one clip; returns (and with ``out`` writes) the summary."""
    from fusionkit.engine.checkpoint import atomic_write_bytes
    from fusionkit.engine.evaluate import model_for
    from fusionkit.engine.predict import load_inputs, prepare

    cfg, _, _, dev = prepare(recipe, overrides, None, device)
    inputs = load_inputs(video, cfg)
    model, _ = model_for(cfg, checkpoint, dev)
    with torch.no_grad(), recording() as records:
        model({k: v.to(dev) for k, v in inputs.items()})
    directions = summarise(records)
    if not directions:
        raise UsageError(f"recipe {cfg.get('name') or recipe}: no fusion operator attends through the attention "
                         "entry point (nothing to inspect)")
    result = {"file": str(video), "checkpoint": checkpoint, "directions": directions}
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "entropy.json", (json.dumps(result, indent=2) + "\n").encode())
        atomic_write_bytes(folder / "entropy.png", draw(directions, f"{cfg.get('name') or recipe}: {Path(video).name}"))
    return result


def cmd_inspect(args: argparse.Namespace) -> int:
    result = run_inspect(args.recipe, args.video, args.checkpoint, args.overrides, args.out)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for name, d in result["directions"].items():
        values = "  ".join(f"{s}:{v:.3f}" for s, v in zip(d["steps"], d["normalised"]))
        print(f"{name:24s} entropy / log(keys) per step  {values}")
    if args.out:
        print(f"wrote {Path(args.out) / 'entropy.json'} and {Path(args.out) / 'entropy.png'}")
    return 0


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``inspect RECIPE [overrides] --video FILE [--checkpoint C] [--out DIR] [--json]``."""
    p = subparsers.add_parser("inspect", help="cross-attention entropy per layer of every fusion direction",
                              description="Run the recipe's model on one clip and report, per fusion direction "
                              "and layer, the entropy of its attention rows (CA²ST Fig. 8); --out writes "
                              "entropy.json and entropy.png.")
    p.add_argument("recipe", help="recipe file or name in recipes/ (e.g. cast, tiny)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides")
    p.add_argument("--video", required=True, help="media file (or .safetensors with the recipe's input tensors)")
    p.add_argument("--checkpoint", default=None, help="a .safetensors checkpoint (default: untrained operators)")
    p.add_argument("--out", default=None, metavar="DIR", help="write entropy.json and entropy.png there")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_inspect)
    return p

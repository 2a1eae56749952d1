"""``fusionkit inspect RECIPE --video FILE [--checkpoint C] [--out DIR]``: where the fusion operators attend.

One forward of the recipe's model on a clip's test views (decoded as ``fusionkit predict`` does) under
:func:`fusionkit.attention.recording`: every attention call inside a fusion operator is recorded with
its label (``<operator>/<step>`` from the graph, ``/<direction>`` from operators that name one, as
B-CA and LAVISH do), so any operator whose attention goes through the entry point is covered, none
re-computed here.

* **Entropy**: for each direction and step, the mean entropy (nats) of the attention rows (every
  query of every window, head and view) and the same divided by the log of the keys the row may
  attend (1 = uniform, 0 = one key): the quantity of the CA²ST paper's Fig. 8.
* **Maps**: where :func:`~fusionkit.attention.windowed` stated the key side (its window plan), the
  attention each key token receives (weights summed over the queries, averaged over heads and views)
  is put back on the key expert's patch grid, as a share of the step's attention, and drawn over what
  that expert sees (its frames after its frame selection; a spectrogram for an audio expert with a
  frontend) for up to four steps and eight time positions.

Writes ``DIR/entropy.json`` (``{"file", "checkpoint", "directions": {name: {"steps", "entropy",
"normalised", "keys"}}, "maps": {name: {"query", "key", "grid", "steps", "share"}}}``),
``DIR/entropy.png`` (one line per direction over the steps) and ``DIR/attention_<direction>.png``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fusionkit.attention import AttentionRecord, recording
from fusionkit.engine.commands import recipe_parser
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


def received(rec: AttentionRecord) -> Tensor | None:
    """Attention each key token of the record receives, ``(B, L_k)`` (weights summed over queries,
    averaged over heads), through the key window plan; ``None`` when the call stated none or its keys
    are not the plan's tokens (LAVISH's latents)."""
    plan, layout, batch = (rec.context.get(k) for k in ("key_plan", "key_layout", "key_batch"))
    if plan is None:
        return None
    keys = rec.weights.shape[-1]
    if keys != (plan.seqlens[0] if plan.uniform and rec.weights.shape[0] != batch else sum(plan.seqlens)):
        return None
    flat = rec.weights.sum(-2).mean(1).reshape(batch, -1)  # (B, Σ keys) in the plan's order
    return torch.zeros(batch, layout.length).index_add_(1, plan.index, flat)


def attention_maps(records: Sequence[AttentionRecord]) -> dict[str, dict[str, Any]]:
    """``{direction: {"query", "key", "grid": [T, H, W], "steps", "share": per step (T, H, W)}}``: the share
    of the step's attention each key patch receives (extras left out), mean over the views."""
    maps: dict[str, dict[str, Any]] = {}
    for rec in records:
        parts, heat = rec.label.split("/"), received(rec)
        if heat is None or len(parts) < 2 or not parts[1].isdigit():
            continue
        layout = rec.context["key_layout"]
        _, patches = layout.split(heat[..., None])  # (B, T, N, 1)
        grid = patches.mean(0)[..., 0].reshape(layout.t, layout.h, layout.w)
        entry = maps.setdefault(".".join([parts[0], *parts[2:]]), {
            "query": rec.context.get("query"), "key": rec.context.get("key"),
            "grid": [layout.t, layout.h, layout.w], "by_step": {}})
        step = int(parts[1])
        entry["by_step"][step] = entry["by_step"].get(step, 0) + grid
    for entry in maps.values():
        by_step = entry.pop("by_step")
        entry["steps"] = sorted(by_step)
        entry["share"] = [(by_step[s] / by_step[s].sum().clamp(min=1e-12)) for s in entry["steps"]]
    return maps


def seen_by(expert: nn.Module, inputs: Tensor) -> Tensor | None:
    """What ``expert`` sees of the first view of its input, as images ``(T, H, W, C)`` in [0, 1]: frames after
    its frame selection, or its frontend's spectrogram ``(frames, mel)`` drawn mel × frames; else ``None``."""
    x = inputs[:1].float()
    frontend = getattr(expert, "frontend", None)
    if isinstance(frontend, nn.Module) and not isinstance(frontend, nn.Identity):
        x = frontend(x)
    select = getattr(expert, "frame_select", None)
    if x.dim() == 5:
        x = (select(x) if callable(select) else x)[0].permute(1, 2, 3, 0)  # (T, H, W, C)
    elif x.dim() == 3:
        x = x[0].T.flip(0)[None, ..., None]  # (1, mel, frames, 1), low frequencies at the bottom
    else:
        return None
    if x.shape[-1] == 2:  # a displacement field: its magnitude
        x = x.norm(dim=-1, keepdim=True)
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x - lo) / (hi - lo).clamp(min=1e-6)).clamp(0, 1)


def _evenly(n: int, most: int) -> list[int]:
    return sorted({round(i * (n - 1) / max(most - 1, 1)) for i in range(min(n, most))})


def draw_map(name: str, entry: Mapping[str, Any], background: Tensor | None) -> bytes:
    """PNG: the key patches' share of attention (up to 4 steps × 8 time positions) over ``background``."""
    import io

    import torch.nn.functional as F
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = _evenly(len(entry["steps"]), 4), _evenly(entry["grid"][0], 8)
    wide = entry["grid"][0] == 1  # one time position (a spectrogram): one wide panel per step
    fig = Figure(figsize=(4.8 if wide else 1.6 * len(cols) + 0.4, (1.3 if wide else 1.6) * len(rows) + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    for r, i in enumerate(rows):
        share = entry["share"][i]
        scale = {"vmin": 0.0, "vmax": float(share.max()), "aspect": "auto" if wide else "equal"}  # one scale per step
        for c, t in enumerate(cols):
            ax, heat = axes[r][c], share[t]
            if background is not None:
                image = background[min(t * background.shape[0] // share.shape[0], background.shape[0] - 1)]
                ax.imshow(image.numpy() if image.shape[-1] == 3 else image[..., 0].numpy(), cmap="gray",
                          aspect=scale["aspect"])
                heat = F.interpolate(heat[None, None], size=image.shape[:2], mode="nearest")[0, 0]
            ax.imshow(heat.numpy(), cmap="inferno", alpha=0.6 if background is not None else 1.0, **scale)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"step {entry['steps'][i]}, t={t}", fontsize=7)
    fig.suptitle(f"{name}: attention received by {entry['key'] or 'the keys'} (query {entry['query'] or '?'})",
                 fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


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
    maps = attention_maps(records)
    result = {"file": str(video), "checkpoint": checkpoint, "directions": directions,
              "maps": {name: {**{k: v for k, v in m.items() if k != "share"},
                              "share": [[[[round(float(v), 6) for v in row] for row in frame] for frame in share]
                                        for share in m["share"]]} for name, m in maps.items()}}
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "entropy.json", (json.dumps(result) + "\n").encode())
        atomic_write_bytes(folder / "entropy.png", draw(directions, f"{cfg.get('name') or recipe}: {Path(video).name}"))
        for name, m in maps.items():
            expert = model.experts[m["key"]] if m["key"] in model.experts else None
            view = seen_by(expert, inputs[expert.modality]) if expert is not None and expert.modality in inputs \
                else None
            atomic_write_bytes(folder / f"attention_{name}.png", draw_map(name, m, view))
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
        maps = ", ".join(f"attention_{name}.png" for name in result["maps"])
        print(f"wrote {Path(args.out) / 'entropy.json'}, entropy.png" + (f" and {maps}" if maps else ""))
    return 0


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``inspect RECIPE [overrides] --video FILE [--checkpoint C] [--out DIR] [--json]``."""
    p = recipe_parser(subparsers, "inspect", "cross-attention entropy and maps per layer of every fusion direction",
                      "Run the recipe's model on one clip and report, per fusion direction and layer, the entropy "
                      "of its attention rows (CA²ST Fig. 8); --out writes entropy.json, entropy.png and "
                      "attention_<direction>.png (the attention each key patch receives, over the key expert's "
                      "frames or spectrogram).")
    p.add_argument("--video", required=True, help="media file (or .safetensors with the recipe's input tensors)")
    p.add_argument("--checkpoint", default=None, help="a .safetensors checkpoint (default: untrained operators)")
    p.add_argument("--out", default=None, metavar="DIR", help="write entropy.json and the PNGs there")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_inspect)
    return p

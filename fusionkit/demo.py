"""``fusionkit demo``: a short smoke run on synthetic media with tiny random experts.

It builds a CAST-like trio (a per-frame image ViT on frames 1, 3, 5, … a VideoMAE tubelet ViT and
an AST audio ViT), runs a synthetic clip and waveform through them, exchanges information with
windowed cross-attention (time window spatial→temporal, space window temporal→spatial, global
window audio→spatial) on every available attention backend, prints what it measured, and finally
trains the tiny recipe for one epoch on synthetic clips with the engine (progress bar and summary).
"""

from __future__ import annotations

import math
import tempfile
import time

import torch

from fusionkit.adapters import attach_adapters
from fusionkit.engine.trainer import train
from fusionkit.attention import Attention, use_backend, windowed
from fusionkit.experts.base import Expert, Tokens
from fusionkit.registry import EXPERTS
from fusionkit.trainable import render_report, trainable_report


EXPERTS_BY_CLASS: dict[type, str] = {}


def synthetic_clip(frames: int, size: int, batch: int = 2) -> torch.Tensor:
    """A bright square moving across a dark background: ``(B, 3, T, H, W)``."""
    video = torch.full((batch, 3, frames, size, size), -1.0)
    side = size // 4
    for t in range(frames):
        x0 = (t * (size - side)) // max(frames - 1, 1)
        video[:, :, t, size // 3: size // 3 + side, x0: x0 + side] = 1.0
    return video


def synthetic_audio(seconds: float = 1.0, rate: int = 16000, batch: int = 2) -> torch.Tensor:
    """A rising chirp ``(B, samples)``."""
    t = torch.arange(int(seconds * rate)) / rate
    return torch.sin(2 * math.pi * (200 + 600 * t) * t).expand(batch, -1).clone()


def timed(fn, *args):  # noqa: ANN001, ANN202 - tiny helper
    start = time.perf_counter()
    out = fn(*args)
    return out, 1e3 * (time.perf_counter() - start)


def run_demo(frames: int = 16, size: int = 64) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 100))
    EXPERTS_BY_CLASS.update({e.obj: e.name for e in EXPERTS.entries()})
    torch.manual_seed(0)
    dim, heads = 96, 4
    experts: dict[str, Expert] = {
        "spatial": EXPERTS.build("timm_vit", name="vit_tiny_patch16_224", img_size=size, depth=2, embed_dim=dim,
                                 num_heads=heads, frame_select={"stride": 2, "offset": 1}),
        "temporal": EXPERTS.build("videomae_vit", embed_dim=dim, depth=2, num_heads=heads, img_size=size,
                                  num_frames=frames),
        "audio": EXPERTS.build("ast", embed_dim=dim, depth=2, num_heads=heads, num_mel_bins=128, max_length=100),
    }
    inputs = {"video": synthetic_clip(frames, size), "audio": synthetic_audio()}
    console.rule("[bold]fusionkit demo: tiny random experts on a synthetic clip")

    table = Table(title="Experts (frozen, random init)")
    for col in ("expert", "input", "tokens (B, L, D)", "layout (t, h, w, extras)", "params", "ms"):
        table.add_column(col)
    tokens: dict[str, Tokens] = {}
    for name, expert in experts.items():
        expert.eval()
        with torch.no_grad():
            tokens[name], ms = timed(expert, inputs[expert.modality])
        layout = tokens[name].layout
        table.add_row(f"{name} ({EXPERTS_BY_CLASS.get(type(expert), '?')})",
                      f"{expert.modality} {tuple(inputs[expert.modality].shape)}", str(tuple(tokens[name].x.shape)),
                      f"{layout.t}, {layout.h}, {layout.w}, {layout.extras}{'/frame' if layout.per_frame_extras else ''}",
                      f"{sum(p.numel() for p in expert.parameters()) / 1e6:.2f}M", f"{ms:.0f}")
    console.print(table)

    cross = Attention(dim, heads).eval()
    s, t, a = tokens["spatial"], tokens["temporal"], tokens["audio"]
    exchanges = {
        "T2S (time window)": dict(x=s.x, layout=s.layout, window="time", kv=t.x, kv_layout=t.layout,
                                  query_extras=False),
        "S2T (space window)": dict(x=t.x, layout=t.layout, window="space", kv=s.x, kv_layout=s.layout,
                                   key_extras=False),
        "A2S (global window)": dict(x=s.x, layout=s.layout, window="global", kv=a.x, kv_layout=a.layout),
    }
    backends = ["eager", "sdpa"]  # the demo runs on the CPU, where xformers has no kernel
    table = Table(title="Windowed cross-attention between experts: max |difference| to eager")
    for col in ("exchange", "output", *backends):
        table.add_column(col)
    for label, kw in exchanges.items():
        outs = {}
        for backend in backends:
            with use_backend(backend), torch.no_grad():
                outs[backend] = windowed(cross, **kw)
        ref = outs["eager"]
        table.add_row(label, str(tuple(ref.shape)),
                      *(f"{(o - ref).abs().max().item():.1e}" for o in outs.values()))
    console.print(table)

    spatial = experts["spatial"]
    attach_adapters(spatial, ratio=0.25)
    console.print(render_report(trainable_report(spatial, depth=2), title="spatial expert with AIM adapters"))
    with torch.no_grad():
        same = torch.equal(spatial(inputs["video"]).x, tokens["spatial"].x)
    console.print(f"adapters are zero at init, expert output unchanged: [bold]{same}[/bold]")

    console.rule("[bold]training recipes/tiny.yaml for one epoch (synthetic clips)")
    with tempfile.TemporaryDirectory() as run_dir:
        result = train("tiny", ["train.epochs=1", "train.eval_every=1"], output_dir=run_dir, console=console)
    return 0 if same and result.status == "finished" else 1

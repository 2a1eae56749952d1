"""The ``flow`` modality: block-matching optical flow of the sampled frames (a fusionkit data producer).

For each sampled frame ``n`` the field says where its content was in frame ``n - 1``: every
``BLOCK × BLOCK`` block of frame ``n`` (grey levels) is matched against frame ``n - 1`` shifted by
every whole-pixel offset up to ``RADIUS`` (sum of absolute differences, edges replicated; ties go to
the smallest displacement), and ``flow = -offset`` of the best match, so that
``frame_n(p) ≈ frame_{n-1}(p - flow(p))``: content moving right has ``dx > 0``. Frame 0 has zero flow.
The block's vector fills its pixels; pixels past the last whole block take the nearest block's.
fusionkit crops, resizes and flips the field with the video's draw and rescales the vectors
(``vectors = True``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from einops import rearrange

from fusionkit.data import decode
from fusionkit.data.decode import MediaInfo
from fusionkit.data.producers import FrameStream
from fusionkit.registry import MODALITIES

BLOCK, RADIUS = 8, 4


def grey(frames: np.ndarray) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 RGB → ``(N, H, W)`` float32 luma (BT.601 weights)."""
    return frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def block_flow(prev: np.ndarray, cur: np.ndarray, block: int = BLOCK, radius: int = RADIUS) -> np.ndarray:
    """Flow ``(2, H, W)`` (dx, dy) of ``cur`` from ``prev`` (both ``(H, W)`` float), see the module docstring."""
    h, w = cur.shape
    bh, bw = max(h // block, 1), max(w // block, 1)
    padded = np.pad(prev, radius, mode="edge")
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    offsets.sort(key=lambda o: (abs(o[0]) + abs(o[1]), o))  # argmin keeps the first: the smallest move wins
    cost = np.stack([np.abs(cur - padded[radius + dy:radius + dy + h, radius + dx:radius + dx + w])
                     for dy, dx in offsets])  # (O, H, W)
    cost = cost[:, :bh * block, :bw * block]
    per_block = rearrange(cost, "o (bh b1) (bw b2) -> o bh bw (b1 b2)", b1=block, b2=block).sum(-1)
    best = np.array(offsets, dtype=np.float32)[per_block.argmin(0)]  # (bh, bw, 2): (dy, dx)
    field = -rearrange(best[..., ::-1], "bh bw c -> c bh bw")  # (2, bh, bw): (dx, dy)
    rows = np.minimum(np.arange(h) // block, bh - 1)
    cols = np.minimum(np.arange(w) // block, bw - 1)
    return np.ascontiguousarray(field[:, rows][:, :, cols])


@MODALITIES.register("flow")
class Flow(FrameStream):
    """Optical flow of each sampled frame from the frame before it, float32 ``(2, T, H, W)`` in pixels."""

    channels, vectors = 2, True

    def decode(self, path: str | Path, numbers: Sequence[int], info: MediaInfo) -> np.ndarray:
        pairs = sorted({n for k in numbers for n in (max(k - 1, 0), k)})
        luma = dict(zip(pairs, grey(decode.read_frames(path, pairs, info))))
        return np.stack([block_flow(luma[max(k - 1, 0)], luma[k]) for k in numbers], axis=1)

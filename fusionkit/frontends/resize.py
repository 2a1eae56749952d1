"""``resize``: frames at another resolution before an expert embeds them.

A video expert that sees the clip at a lower resolution than the image expert (a SlowFast-like
"fast" pathway: motion from coarse frames) is built by giving it this front-end and an ``img_size``
equal to ``size``; with ``patch_size`` scaled by the same factor its token grid stays aligned with the
full-resolution expert's, so token-level operators still pair the two.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from fusionkit.registry import FRONTENDS

MODES = ("area", "bilinear", "nearest")


@FRONTENDS.register("resize")
class Resize(nn.Module):
    """Video ``(B, C, T, H, W)`` or images ``(B, C, H, W)`` → the same at ``size × size`` per frame.

    Args:
        size: output side (square frames).
        mode: ``area`` (the mean of each source block: an exact box filter when ``H`` is a multiple
            of ``size``), ``bilinear`` (antialiased when shrinking) or ``nearest``.
    """

    def __init__(self, size: int, mode: str = "area") -> None:
        super().__init__()
        if int(size) < 1:
            raise ValueError(f"resize: size must be >= 1, got {size!r}")
        if mode not in MODES:
            raise ValueError(f"resize: mode must be one of {MODES}, got {mode!r}")
        self.size, self.mode = int(size), mode

    def forward(self, frames: Tensor) -> Tensor:
        if frames.dim() not in (4, 5):
            raise ValueError(f"resize: expected (B, C, T, H, W) or (B, C, H, W), got {tuple(frames.shape)}")
        video = frames.dim() == 5
        x = rearrange(frames, "b c t h w -> (b t) c h w") if video else frames
        options = {"antialias": True, "align_corners": False} if self.mode == "bilinear" else {}
        x = F.interpolate(x, size=(self.size, self.size), mode=self.mode, **options)
        return rearrange(x, "(b t) c h w -> b c t h w", b=frames.shape[0]) if video else x

    def extra_repr(self) -> str:
        return f"size={self.size}, mode={self.mode}"

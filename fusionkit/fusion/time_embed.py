"""Time-Interval MLP (TIM, used by CAVA/CA²ST instead of B-CA position embeddings).

Each token gets the embedding of the time interval it covers, ``MLP([start, end])`` with times
normalised to the clip (0 … 1):

* a video layout with ``T > 1`` frames: frame ``t`` covers ``[t/T, (t+1)/T]``, shared by its patches;
* a spectrogram layout (``T = 1``, time along the ``w`` columns, as AST's): the columns are split into
  ``groups`` consecutive groups (default: the largest frame count among the joined experts), column
  ``w`` belonging to group ``⌊w·G/W⌋``, so audio group ``g`` and video frame ``g`` share an interval.

Extra tokens get a zero embedding (they do not take part in B-CA cross-attention).
CA²ST leaves depth and width open; fusionkit uses ``Linear(2, hidden) → GELU → Linear(hidden, d)``
with ``hidden = 128``, one MLP per B-CA layer shared by all its directions: 49,920 parameters per layer
at ``d = 384``, 0.60M over 12 layers, the +0.6M of CA²ST (43.2M → 43.8M).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fusionkit.attention import TokenLayout


def token_intervals(layout: TokenLayout, groups: int) -> tuple[Tensor, Tensor]:
    """``(L, 2)`` normalised ``[start, end]`` per token and ``(L,)`` bool, ``True`` for patch tokens."""
    patches = layout.patch_index()  # (T, H, W) positions
    intervals = torch.zeros(layout.length, 2)
    is_patch = torch.zeros(layout.length, dtype=torch.bool)
    if layout.t > 1:
        slot = torch.arange(layout.t).reshape(-1, 1, 1).expand_as(patches)
        count = layout.t
    else:
        slot = (torch.arange(layout.w) * groups // layout.w).reshape(1, 1, -1).expand_as(patches)
        count = groups
    intervals[patches.reshape(-1), 0] = slot.reshape(-1).float() / count
    intervals[patches.reshape(-1), 1] = (slot.reshape(-1).float() + 1) / count
    is_patch[patches.reshape(-1)] = True
    return intervals, is_patch


class TimeIntervalMLP(nn.Module):
    """``[start, end] → Linear(2, hidden) → GELU → Linear(hidden, dim)`` per token.

    Args:
        dim: embedding width (the B-CA bottleneck width).
        hidden: hidden width of the MLP.
        groups: time groups of a spectrogram layout (see the module docstring).
    """

    def __init__(self, dim: int, hidden: int = 128, groups: int = 8) -> None:
        super().__init__()
        self.groups = groups
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self._cache: dict[TokenLayout, tuple[Tensor, Tensor]] = {}

    def no_weight_decay(self) -> set[str]:
        """Every weight: the MLP is the time embedding, which takes the place of position embeddings."""
        return {name for name, _ in self.named_parameters()}

    def forward(self, layout: TokenLayout) -> Tensor:
        """``(L, dim)`` embeddings for the tokens of ``layout`` (zero for extras)."""
        if layout not in self._cache:
            self._cache[layout] = token_intervals(layout, self.groups)
        intervals, is_patch = self._cache[layout]
        weight = self.mlp[0].weight
        emb = self.mlp(intervals.to(weight.device, weight.dtype))
        return emb * is_patch.to(emb.device)[:, None]

"""Token layouts: how a ``(B, L, D)`` token tensor maps onto a ``(T, H, W)`` grid plus extra tokens.

Every expert stores its tokens as one ``(B, L, D)`` tensor and describes them with a
:class:`TokenLayout`. Two storage orders exist:

* extras per frame (an image model applied to each frame, e.g. CLIP with one CLS per frame)::

      [e_0 .. e_{E-1}, p_(0,0) .. p_(H-1,W-1)]  for frame 0, then frame 1, ...   L = T·(E + H·W)

* extras per clip (a video or audio model with CLS / distillation tokens for the whole input)::

      [e_0 .. e_{E-1}, p_(t=0,0,0) .. p_(t=T-1,H-1,W-1)]                             L = E + T·H·W

Patches are frame-major (``t h w`` order). A model without extra tokens sets ``extras=0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor


@dataclass(frozen=True)
class TokenLayout:
    """Tokens of a ``(T, H, W)`` grid plus ``extras`` leading tokens (CLS, distillation, ...).

    Attributes:
        t: time steps (frames, tubelets, audio segments); 1 for a single image or spectrogram.
        h, w: patch grid (rows, columns). For an AST spectrogram ``h`` is frequency, ``w`` time.
        extras: number of extra tokens (per frame or per clip, see ``per_frame_extras``).
        per_frame_extras: ``True`` when every frame carries its own extras.
    """

    t: int
    h: int
    w: int
    extras: int = 0
    per_frame_extras: bool = False

    def __post_init__(self) -> None:
        if min(self.t, self.h, self.w) < 1 or self.extras < 0:
            raise ValueError(f"invalid TokenLayout {self}: t, h, w must be >= 1 and extras >= 0")

    @property
    def n(self) -> int:
        """Patches per frame (``H·W``)."""
        return self.h * self.w

    @property
    def num_extra_tokens(self) -> int:
        return self.extras * (self.t if self.per_frame_extras else 1)

    @property
    def length(self) -> int:
        """``L``: tokens stored for one sample."""
        return self.t * self.n + self.num_extra_tokens

    def patch_index(self) -> Tensor:
        """``(T, H, W)`` positions of the patch tokens in the stored sequence."""
        grid = torch.arange(self.t * self.n).reshape(self.t, self.h, self.w)
        if self.per_frame_extras:
            return grid + self.extras * (torch.arange(self.t).reshape(-1, 1, 1) + 1)
        return grid + self.extras

    def extra_index(self) -> Tensor:
        """Positions of the extra tokens: ``(T, E)`` when per frame, else ``(1, E)``."""
        if self.per_frame_extras:
            return torch.arange(self.extras) + (self.extras + self.n) * torch.arange(self.t).reshape(-1, 1)
        return torch.arange(self.extras).reshape(1, -1)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Split ``(B, L, D)`` into extras ``(B, T|1, E, D)`` and patches ``(B, T, N, D)``."""
        self.check(x)
        if self.per_frame_extras:
            x = rearrange(x, "b (t s) d -> b t s d", t=self.t)
            return x[:, :, : self.extras], x[:, :, self.extras:]
        extras = x[:, None, : self.extras]
        return extras, rearrange(x[:, self.extras:], "b (t n) d -> b t n d", t=self.t)

    def join(self, extras: Tensor, patches: Tensor) -> Tensor:
        """Inverse of :meth:`split`: ``(B, T|1, E, D)`` and ``(B, T, N, D)`` to ``(B, L, D)``."""
        if self.per_frame_extras:
            return rearrange(torch.cat([extras, patches], dim=2), "b t s d -> b (t s) d")
        return torch.cat([extras[:, 0], rearrange(patches, "b t n d -> b (t n) d")], dim=1)

    def check(self, x: Tensor, what: str = "tokens") -> None:
        """Raise a ``ValueError`` naming both shapes when ``x`` is not ``(B, L, D)`` for this layout."""
        if x.dim() != 3 or x.shape[1] != self.length:
            raise ValueError(f"{what} of shape {tuple(x.shape)} do not match {self}: expected (B, {self.length}, D)")

"""``lateral``: layer-wise bidirectional lateral connections (the "Lateral" baseline of CAST).

CAST Table 1 (b) / Figure 7 (c) and CA²ST Table IX: in every layer each expert adds the
other expert's tokens, passed through a linear projection, element-wise to its own::

    Y_a' = Y_a + DropPath( Σ_{b → a} R_{b→a}(W_{b→a} · Y_b) )        W_{b→a}: D_b → D_a

* ``W_{b→a}`` is one ``nn.Linear`` per direction, **zero-initialised** (weight and bias), so the
  graph is the identity at init (``zero_init = True``) and the experts start as they were
  pretrained, as for B-CA.
* Element-wise addition needs one source token per target token. Patches are matched by their
  ``(t, h, w)`` position: when the two grids are equal (CAST: CLIP frame ``k`` and VideoMAE
  tubelet ``k`` on the same 14×14 grid) this is the plain patch-to-patch sum; otherwise the
  projected source grid is resampled to the target grid (``resample``: ``trilinear`` (default),
  ``nearest`` or ``area``; e.g. AST's 12×101 frequency × time patches onto CLIP's 8×14×14).
* Extra tokens of the target (CLS, distillation) have no position: they receive the mean of the
  resampled, projected source patches of their frame (per-frame extras) or of the whole clip
  (per-clip extras). Extra tokens of the source are not sent.
* Site: ``post_attn`` by default, where B-CA sits in CAST, so that the baseline differs from CAST
  only in *how* the experts exchange (``site: post_mlp`` puts it after the whole layer). Both
  directions read the tokens as they were before the operator (a simultaneous exchange).

Options:
    directions: ``{name: {query: a, key: b}}`` or ``[b->a, ...]`` (:mod:`fusionkit.fusion.directions`;
        no window: tokens are matched by position); default: every ordered pair of the joined experts
        (``<b>_to_<a>``). ``null`` removes one direction (a one-way lateral connection).
    resample: how a source grid different from the target's is matched (see above).
    drop_path: stochastic depth of the update (the graph's rate for this step).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath
from torch import Tensor, nn

from fusionkit.attention import TokenLayout
from fusionkit.fusion.base import FusionOp, SiteState
from fusionkit.fusion.directions import parse_directions
from fusionkit.registry import FUSIONS

RESAMPLE = ("trilinear", "nearest", "area")


def resample_patches(patches: Tensor, source: TokenLayout, target: TokenLayout, mode: str = "trilinear") -> Tensor:
    """Patches ``(B, T_s, N_s, D)`` of ``source``'s grid onto ``target``'s grid: ``(B, T_t, N_t, D)``.

    Identity when the ``(T, H, W)`` grids agree; otherwise ``F.interpolate`` over ``(T, H, W)``
    (``align_corners=False`` for ``trilinear``).
    """
    if (source.t, source.h, source.w) == (target.t, target.h, target.w):
        return patches
    grid = rearrange(patches, "b t (h w) d -> b d t h w", h=source.h, w=source.w)
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    grid = F.interpolate(grid, size=(target.t, target.h, target.w), mode=mode, **kwargs)
    return rearrange(grid, "b d t h w -> b t (h w) d")


def extras_update(patches: Tensor, layout: TokenLayout) -> Tensor:
    """What the extras of ``layout`` receive from patch updates ``(B, T, N, D)``: ``(B, T|1, E, D)``.

    Per-frame extras get the mean over their frame, per-clip extras the mean over the clip.
    """
    if layout.per_frame_extras:
        mean = patches.mean(dim=2, keepdim=True)
    else:
        mean = patches.mean(dim=(1, 2), keepdim=True)[:, :1]
    return mean.expand(-1, -1, layout.extras, -1)


@FUSIONS.register("lateral")
class Lateral(FusionOp):
    """Lateral connections (CAST / CAVA baseline): tokens added element-wise through a zero-init linear.

    See the module docstring. Parameters ``proj.<direction>.weight`` ``(D_target, D_source)`` and
    ``.bias``, one direction per ordered pair of experts by default.
    """

    site = "post_attn"
    zero_init = True  # the graph is the identity at init (zero projections)

    def __init__(self, *, experts: list[str], dims: Mapping[str, int], layouts: Mapping[str, TokenLayout],
                 drop_path: float = 0.0,
                 directions: Mapping[str, Mapping[str, str] | None] | Sequence[str] | None = None,
                 resample: str = "trilinear") -> None:
        super().__init__(experts=experts)
        if resample not in RESAMPLE:
            raise ValueError(f"lateral: unknown resample {resample!r}; valid: {', '.join(RESAMPLE)}")
        self.resample = resample
        self.directions = {name: (d.key, d.query) for name, d in
                           parse_directions("lateral", experts, directions, window=None).items()}
        self.proj = nn.ModuleDict()
        for name, (b, a) in self.directions.items():
            proj = nn.Linear(dims[b], dims[a])
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)
            self.proj[name] = proj
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, state: SiteState) -> dict[str, Tensor]:
        """New tokens ``(B, L_a, D_a)`` of every target expert ``a``."""
        updates: dict[str, Tensor] = {}
        for name, (b, a) in self.directions.items():
            src, dst = state.layouts[b], state.layouts[a]
            _, patches = src.split(state.x[b])                          # (B, T_b, N_b, D_b)
            moved = resample_patches(self.proj[name](patches), src, dst, self.resample)  # (B, T_a, N_a, D_a)
            updates[a] = updates[a] + moved if a in updates else moved
        out = {}
        for a, patches in updates.items():
            layout = state.layouts[a]
            if layout.extras:
                delta = layout.join(extras_update(patches, layout), patches)
            else:
                delta = layout.join(patches.new_zeros(patches.shape[0], 1, 0, patches.shape[-1]), patches)
            out[a] = state.x[a] + self.drop_path(delta)
        return out

    def extra_repr(self) -> str:
        dirs = ", ".join(f"{n}: {b}->{a}" for n, (b, a) in self.directions.items())
        return f"directions=[{dirs}], resample={self.resample}"


__all__ = ["Lateral", "extras_update", "resample_patches"]

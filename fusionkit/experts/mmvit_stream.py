"""MM-ViT streams (MM-ViT §3.2): one transformer, one modality-specific embedding per modality.

MM-ViT runs every modality of a compressed video (I-frames, motion vectors, residuals, audio)
through *one* ViT whose weights are shared; only the embeddings are modality-specific. In
fusionkit every modality is a stream (an expert) and the factorised attention is a fusion operator
(:mod:`fusionkit.fusion.mmvit`):

* ``mmvit_vit``: the stream that owns the transformer: a timm ViT (any size, ImageNet weights
  optional) whose embedding gives **one CLS per clip** and a spatio-temporal position embedding
  (the ViT's spatial ``pos_embed`` plus a learned temporal one, ``time_embed`` ``(T, D)``, zero at
  init), eq. 1. Tokens ``(B, 1 + T·H·W, D)``, layout ``TokenLayout(T, H, W, extras=1)`` (per clip).
* ``mmvit_stream``: another modality through the owner's layers (borrowed, not copied, as in
  :class:`~fusionkit.experts.shared.SharedExpert`) with an embedding of its own:

  - ``channels: C`` -- a visual modality ``(B, C, T, H, W)`` (motion vectors 2, residuals 3, optical
    flow 2, depth 1): ``Conv2d(C, D, P, stride=P)`` patch embedding + spatial ``(N, D)`` and temporal
    ``(T, D)`` position embeddings (eq. 2-3). Tokens ``(B, T·N, D)``, no extras.
  - ``features: F`` -- one vector per time step ``(B, T, F)`` (VGGish audio, F = 128):
    ``Linear(F, D)`` + temporal position embedding ``(T, D)`` (eq. 4), each token **replicated over
    the N spatial positions** so that every (p, t) has a partner. Tokens ``(B, T·N, D)``, no extras.

The patch grid (and patch size) of a borrowing stream are those of the owner, so that all
streams share one ``(T, H, W)`` grid and the operator can pair tokens at the same (p, t).

Recipe (UCF-101, four modalities)::

    experts:
      iframe:   {type: mmvit_vit, name: vit_base_patch16_224, modality: iframe, num_frames: 8, frozen: false}
      motion:   {type: mmvit_stream, expert: iframe, modality: motion, channels: 2, num_frames: 8}
      residual: {type: mmvit_stream, expert: iframe, modality: residual, channels: 3, num_frames: 8}
      audio:    {type: mmvit_stream, expert: iframe, modality: audio, features: 128, num_frames: 8}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from fusionkit.attention import TokenLayout
from fusionkit.experts.base import Expert, FrameSelect, Tokens
from fusionkit.experts.shared import SharedExpert
from fusionkit.experts.timm_vit import TimmViT
from fusionkit.registry import EXPERTS


def _check_frames(t: int, num_frames: int, what: str) -> None:
    if t != num_frames:
        raise ValueError(f"{what}: input has {t} time steps but the temporal position embedding was built for "
                         f"num_frames={num_frames}")


@EXPERTS.register("mmvit_vit")
class MMViTBackbone(TimmViT):
    """MM-ViT's transformer: a timm ViT with one CLS per clip and space + time position embeddings.

    Args:
        num_frames: ``T`` (size of the temporal position embedding ``time_embed`` ``(T, D)``).
        frozen: MM-ViT fine-tunes the whole ViT: ``False`` in its recipes (default ``True`` as for
            every expert).
        name, pretrained, frame_select, pool, drop_path, modality, **kwargs: as for ``timm_vit``.

    ``embed(video (B, 3, T, H, W)) -> Tokens((B, 1 + T·N, D), TokenLayout(T, H, W, extras=1))``:
    patches ``E·x(p,t) + pos_embed[1 + p] + time_embed[t]``, then the CLS ``cls_token + pos_embed[0]``.
    """

    def __init__(self, name: str = "vit_base_patch16_224", pretrained: str | bool | None = None,
                 frame_select: FrameSelect | dict[str, Any] | None = None, pool: str | None = None,
                 drop_path: float = 0.0, frozen: bool = True, modality: str = "video", num_frames: int = 8,
                 **kwargs: Any) -> None:
        super().__init__(name, pretrained, frame_select, pool, drop_path=drop_path, frozen=False, modality=modality,
                         **kwargs)
        vit = self.vit
        if getattr(vit, "cls_token", None) is None or getattr(vit, "reg_token", None) is not None \
                or vit.num_prefix_tokens != 1 or getattr(vit, "no_embed_class", False):
            raise ValueError(f"mmvit_vit needs a ViT with one class token and a position embedding over it "
                             f"(got {name!r} with num_prefix_tokens={vit.num_prefix_tokens})")
        if getattr(vit, "dynamic_img_size", False):
            raise ValueError("mmvit_vit: dynamic_img_size is not supported (the streams share one patch grid)")
        self.num_frames = int(num_frames)
        self.time_embed = nn.Parameter(torch.zeros(self.num_frames, vit.embed_dim))
        if frozen:
            self.freeze()

    def no_weight_decay(self) -> set[str]:
        """The temporal position embedding (the timm ViT declares its own ``pos_embed`` and ``cls_token``)."""
        return {"time_embed"}

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.patch_size)

    def embed(self, inputs: Tensor) -> Tokens:
        """Video ``(B, 3, T, H, W)`` (frames selected) to ``(B, 1 + T·N, D)`` tokens, one CLS per clip."""
        video = self.frame_select(inputs) if inputs.dim() == 5 else inputs[:, :, None]
        b, t = video.shape[0], video.shape[2]
        _check_frames(t, self.num_frames, f"mmvit_vit ({self.modality})")
        x = self.vit.patch_embed(rearrange(video, "b c t h w -> (b t) c h w"))  # (B·T, N, D)
        pos = self.vit.pos_embed[0]                                              # (1 + N, D)
        if x.shape[1] != pos.shape[0] - 1:
            raise ValueError(f"mmvit_vit: {x.shape[1]} patches per frame but the position embedding holds "
                             f"{pos.shape[0] - 1}: the input size differs from img_size")
        x = rearrange(x + pos[1:], "(b t) n d -> b t n d", b=b) + self.time_embed[:, None]
        cls = (self.vit.cls_token[0] + pos[:1]).expand(b, 1, -1)
        x = torch.cat([cls, rearrange(x, "b t n d -> b (t n) d")], dim=1)
        x = self.vit.norm_pre(self.vit.pos_drop(x))
        h, w = self.grid
        return Tokens(x, TokenLayout(t, h, w, extras=1))


@EXPERTS.register("mmvit_stream")
class MMViTStream(SharedExpert):
    """One more MM-ViT modality through the owner's layers, with its own embedding (eq. 2-4).

    Args:
        expert: the stream owning the transformer (in a recipe: its name), usually ``mmvit_vit``.
        modality: batch key read.
        channels: a visual modality ``(B, C, T, H, W)`` with ``C`` channels (patch embedding), or
        features: a per-time-step vector modality ``(B, T, F)`` (linear embedding, tokens replicated
            over the patch grid). Exactly one of the two.
        num_frames: ``T`` of the temporal position embedding.
        pool: pooling mode (default ``avg``: these streams have no CLS).
        frozen: freeze the embedding (default ``False``: MM-ViT trains it).
        frontend: ``{type: <registered frontend>, ...}`` turning the batch's modality into the stream's
            input first (e.g. ``spectrogram_image`` for audio as images); ``None``: the input as it is.

    Parameters (``D`` the owner's width, ``P`` its patch size, ``N`` its patches per frame):
    ``patch_embed`` ``(D, C, P, P)`` + ``(D,)`` and ``pos_embed`` ``(N, D)``, or ``proj`` ``(D, F)`` +
    ``(D,)``; both ``time_embed`` ``(T, D)``.
    """

    def __init__(self, expert: Expert, modality: str, channels: int | None = None, features: int | None = None,
                 num_frames: int = 8, pool: str = "avg", frozen: bool = False,
                 frontend: Mapping[str, Any] | nn.Module | None = None) -> None:
        super().__init__(expert, modality, frontend=frontend, pool=pool)
        if (channels is None) == (features is None):
            raise ValueError(f"mmvit_stream ({modality}): give exactly one of channels (a visual modality) or "
                             f"features (a per-time-step vector), got channels={channels}, features={features}")
        if not hasattr(expert, "grid") or not hasattr(expert, "patch_size"):
            raise ValueError(f"mmvit_stream ({modality}): the borrowed expert {type(expert).__name__} has no patch "
                             "grid; borrow from an mmvit_vit expert")
        dim = expert.dims[0]
        self.grid = tuple(expert.grid)
        self.num_frames = int(num_frames)
        self.channels, self.features = channels, features
        if channels is not None:
            self.patch_embed = nn.Conv2d(int(channels), dim, kernel_size=expert.patch_size, stride=expert.patch_size)
            self.pos_embed = nn.Parameter(0.02 * torch.randn(self.grid[0] * self.grid[1], dim))
        else:
            self.proj = nn.Linear(int(features), dim)
        self.time_embed = nn.Parameter(torch.zeros(self.num_frames, dim))
        if frozen:
            for p in self.parameters():
                p.requires_grad_(False)

    def no_weight_decay(self) -> set[str]:
        """The stream's position embeddings: spatial ``pos_embed`` (visual modalities) and ``time_embed``."""
        return {"pos_embed", "time_embed"}

    def embed(self, inputs: Tensor) -> Tokens:
        """``(B, C, T, H, W)`` or ``(B, T, F)`` (after ``frontend``) to ``(B, T·N, D)`` tokens on the owner's grid."""
        inputs = self.frontend(inputs)
        h, w = self.grid
        what = f"mmvit_stream ({self.modality})"
        if self.channels is not None:
            if inputs.dim() != 5 or inputs.shape[1] != self.channels:
                raise ValueError(f"{what}: expected (B, {self.channels}, T, H, W), got {tuple(inputs.shape)}")
            b, t = inputs.shape[0], inputs.shape[2]
            _check_frames(t, self.num_frames, what)
            x = self.patch_embed(rearrange(inputs, "b c t h w -> (b t) c h w"))
            if tuple(x.shape[2:]) != (h, w):
                raise ValueError(f"{what}: input of size {tuple(inputs.shape[3:])} gives a {tuple(x.shape[2:])} "
                                 f"patch grid, the owner's is {(h, w)}")
            x = rearrange(x, "(b t) d h w -> b t (h w) d", b=b) + self.pos_embed + self.time_embed[:, None]
        else:
            if inputs.dim() != 3 or inputs.shape[2] != self.features:
                raise ValueError(f"{what}: expected (B, T, {self.features}), got {tuple(inputs.shape)}")
            b, t = inputs.shape[:2]
            _check_frames(t, self.num_frames, what)
            x = repeat(self.proj(inputs) + self.time_embed, "b t d -> b t n d", n=h * w)
        return Tokens(rearrange(x, "b t n d -> b (t n) d"), TokenLayout(t, h, w))

    def extra_repr(self) -> str:
        kind = f"channels={self.channels}" if self.channels is not None else f"features={self.features}"
        return f"modality={self.modality}, {kind}, grid={self.grid}, num_frames={self.num_frames}"


__all__ = ["MMViTBackbone", "MMViTStream"]

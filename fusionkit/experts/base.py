"""The expert protocol: a frozen network that turns one modality into tokens with a layout.

An expert exposes

* ``modality``: the batch key it reads (``"video"`` ``(B, 3, T, H, W)``, ``"audio"`` ``(B, samples)`` or
  frontend features);
* ``embed(inputs) -> Tokens``: tokens ``(B, L, D)`` and their :class:`~fusionkit.attention.TokenLayout`;
* ``layers``: an ``nn.ModuleList`` run in order, each a :class:`~fusionkit.experts.layer.StepLayer`
  (transformer layers such as :class:`~fusionkit.experts.block.Block`, whose ``attend`` /
  ``feed_forward`` steps let fusion operators act between attention and MLP) or a
  :class:`~fusionkit.experts.layer.Stage` (CNN stages, patch mergings: ``stage(x, layout) -> (x, layout)``);
* ``dims``: the token width after each layer;
* ``final_norm`` (on all tokens after the last layer), ``pool(tokens, mode)`` and ``pool_norm``
  (after pooling) for the clip feature ``(B, D)``. Both are registered on the expert itself (never
  also inside a wrapped model, so every parameter has one name), which lets a recipe unfreeze
  ``experts.*.pool_norm.*`` whatever the expert.

``forward(inputs)`` runs the expert alone (no fusion) and returns the final :class:`Tokens`.
Experts are frozen at construction unless ``frozen=False``; adapters attached later train.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor, nn

from fusionkit.attention import TokenLayout
from fusionkit.experts.layer import StepLayer
from fusionkit.registry import FRONTENDS

POOL_MODES = ("cls", "extras", "avg", "max", "frame_max")


class Tokens(NamedTuple):
    """Tokens ``x`` ``(B, L, D)`` with the layout that says what each of the ``L`` tokens is."""

    x: Tensor
    layout: TokenLayout


def build_frontend(spec: Mapping[str, Any] | nn.Module | None) -> nn.Module:
    """An expert's input front-end from a recipe's ``{type: <registered frontend>, ...options}``, a module,
    or ``None`` (the input as it is)."""
    if isinstance(spec, Mapping):
        options = dict(spec)
        return FRONTENDS.build(options.pop("type"), **options)
    return spec if spec is not None else nn.Identity()


@dataclass(frozen=True)
class FrameSelect:
    """Which frames of a ``(B, C, T, H, W)`` clip an expert sees: ``offset::stride``, at most ``num``.

    CAST's spatial expert takes ``stride=2, offset=1`` of 16 frames so that its frame ``k`` lines up
    with the ``k``-th 2-frame tubelet of VideoMAE.
    """

    stride: int = 1
    offset: int = 0
    num: int | None = None

    def __call__(self, video: Tensor) -> Tensor:
        if video.dim() != 5:
            raise ValueError(f"expected video (B, C, T, H, W), got shape {tuple(video.shape)}")
        out = video[:, :, self.offset::self.stride]
        if self.num is not None:
            if out.shape[2] < self.num:
                raise ValueError(f"frame selection {self} needs {self.num} frames but the clip of "
                                 f"{video.shape[2]} frames gives {out.shape[2]}")
            out = out[:, :, : self.num]
        return out


class Expert(nn.Module):
    """Base class of every expert (see the module docstring for the protocol).

    Args:
        modality: batch key the expert reads.
        pool: default pooling: ``"cls"`` (first extra token; mean over frames when every frame has
            one), ``"extras"`` (mean of all extra tokens, e.g. AST's CLS and distillation) or
            ``"avg"`` (mean of the patch tokens).
    """

    modality: str = "video"
    layers: nn.ModuleList
    dims: list[int]

    def __init__(self, modality: str, pool: str) -> None:
        super().__init__()
        if pool not in POOL_MODES:
            raise ValueError(f"unknown pool mode {pool!r}; valid: {', '.join(POOL_MODES)}")
        self.modality = modality
        self.pool_mode = pool
        self.final_norm: nn.Module = nn.Identity()
        self.pool_norm: nn.Module = nn.Identity()

    @property
    def dim(self) -> int:
        """Width of the final tokens."""
        return self.dims[-1]

    @property
    def feature_dim(self) -> int:
        """Width of the pooled clip feature (``pool``): the final width unless a projection follows."""
        return getattr(self, "output_dim", self.dims[-1])

    @property
    def depth(self) -> int:
        return len(self.layers)

    def embed(self, inputs: Tensor) -> Tokens:
        raise NotImplementedError

    def run_layer(self, index: int, tokens: Tokens) -> Tokens:
        """Layer ``index`` alone (attention + MLP for a Block, a whole stage for a CNN)."""
        layer = self.layers[index]
        if isinstance(layer, StepLayer):
            return Tokens(layer(tokens.x, tokens.layout), tokens.layout)
        return Tokens(*layer(tokens.x, tokens.layout))

    def forward(self, inputs: Tensor) -> Tokens:
        """Embed and run every layer with no fusion; returns the final-normed tokens."""
        tokens = self.embed(inputs)
        for i in range(len(self.layers)):
            tokens = self.run_layer(i, tokens)
        return Tokens(self.final_norm(tokens.x), tokens.layout)

    def pool(self, tokens: Tokens, mode: str | None = None) -> Tensor:
        """Clip feature ``(B, D)`` from final tokens: reduce (``mode``), then ``pool_norm``."""
        mode = mode or self.pool_mode
        extras, patches = tokens.layout.split(tokens.x)
        if mode == "avg":
            feat = patches.mean(dim=(1, 2))
        elif mode == "max":
            feat = patches.amax(dim=(1, 2))
        elif mode == "frame_max":  # the max over each frame's patches, averaged over time
            feat = patches.amax(dim=2).mean(dim=1)
        elif tokens.layout.extras == 0:
            raise ValueError(f"pool mode {mode!r} needs extra tokens but {type(self).__name__} has none "
                             f"({tokens.layout}); use 'avg'")
        elif mode == "cls":
            feat = extras[:, :, 0].mean(dim=1)
        elif mode == "extras":
            feat = extras.mean(dim=(1, 2))
        else:
            raise ValueError(f"unknown pool mode {mode!r}; valid: {', '.join(POOL_MODES)}")
        return self.pool_norm(feat)

    def forward_features(self, inputs: Tensor) -> Tensor:
        """Pooled clip feature ``(B, D)`` of the expert alone."""
        return self.pool(self(inputs))

    def freeze(self) -> Expert:
        """Set ``requires_grad=False`` on every parameter of the expert (adapters included)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self

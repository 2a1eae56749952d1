"""``shared``: a second stream through another expert's frozen layers (LAVISH, AV-STFP, MM-ViT).

LAVISH and AV-STFP run audio and video through *one* frozen image ViT. In fusionkit the audio
stream is an expert of its own, ``shared``, that borrows every layer, norm and pooling of the video
expert (the same weights, not copies) and differs only in how its input becomes tokens: a frontend
turns its modality into what the borrowed expert embeds, e.g. a spectrogram image
``(B, 3, T, H, W)`` for a per-frame ViT. The fusion graph then treats the two streams as two experts
in lockstep, and operators exchange information between them.

Recipe::

    experts:
      video: {type: timm_vit, name: vit_base_patch16_224}
      audio: {type: shared, expert: video, modality: audio,
              frontend: {type: spectrogram_image, size: [224, 224]}}

The borrowed expert is held by reference and not registered as a child module, so its parameters
appear once (under the owner) in ``parameters()`` and in the state dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from fusionkit.experts.base import Expert, Tokens, build_frontend
from fusionkit.registry import EXPERTS


@EXPERTS.register("shared")
class SharedExpert(Expert):
    """Another expert's frozen layers on a second modality (one backbone, two streams).

    Args:
        expert: the expert whose layers, norms and pooling are borrowed (in a recipe: its name).
        modality: the batch key this stream reads (``audio``).
        frontend: ``{type: <registered frontend>, ...options}`` (or a module) turning that modality
            into the input the borrowed expert embeds; ``None`` feeds the input as it is.
        pool: pooling mode (default: the borrowed expert's).
    """

    needs_experts = ("expert",)  # the recipe passes the built expert named by this option

    def __init__(self, expert: Expert, modality: str, frontend: Mapping[str, Any] | nn.Module | None = None,
                 pool: str | None = None) -> None:
        super().__init__(modality, pool or expert.pool_mode)
        del self._modules["final_norm"], self._modules["pool_norm"]  # the borrowed expert's are used
        object.__setattr__(self, "base", expert)  # a reference, not a child: parameters stay with the owner
        self.frontend = build_frontend(frontend)
        self.dims = list(expert.dims)

    @property
    def layers(self) -> nn.ModuleList:  # type: ignore[override]
        return self.base.layers

    @property
    def final_norm(self) -> nn.Module:  # type: ignore[override]
        return self.base.final_norm

    @property
    def pool_norm(self) -> nn.Module:  # type: ignore[override]
        return self.base.pool_norm

    @property
    def feature_dim(self) -> int:
        return self.base.feature_dim

    def embed(self, inputs: Tensor) -> Tokens:
        """``frontend(inputs)`` through the borrowed expert's embedding."""
        return self.base.embed(self.frontend(inputs))

    def pool(self, tokens: Tokens, mode: str | None = None) -> Tensor:
        return self.base.pool(tokens, mode or self.pool_mode)

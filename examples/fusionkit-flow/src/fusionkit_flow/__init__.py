"""fusionkit-flow: optical flow as a third stream of CAST, added from outside fusionkit.

Importing this module (fusionkit does, through the ``fusionkit.plugins`` entry point) registers:

* the modality ``flow`` (:class:`~fusionkit_flow.flow.Flow`): block-matching optical flow of every
  sampled frame from the frame before it, ``(2, T, H, W)`` displacements in pixels;
* the expert ``flow_vit`` (:class:`FlowViT`): a timm ViT per frame with a 2-channel patch embedding
  that reads ``flow``;
* the recipes in ``recipes/`` (``cast_flow_tiny``), found by name like the packaged ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fusionkit.experts.timm_vit import TimmViT
from fusionkit.recipes import register_recipe_dir
from fusionkit.registry import EXPERTS

from fusionkit_flow.flow import Flow  # noqa: F401 - registers the modality

register_recipe_dir(Path(__file__).parent / "recipes")


@EXPERTS.register("flow_vit")
class FlowViT(TimmViT):
    """A timm ViT applied per frame to the flow field ``(B, 2, T, H, W)`` (``in_chans=2``, random init:
    no pretrained image weights fit two channels). Every other argument as ``timm_vit``."""

    def __init__(self, modality: str = "flow", **kwargs: Any) -> None:
        kwargs.setdefault("in_chans", 2)
        super().__init__(modality=modality, **kwargs)

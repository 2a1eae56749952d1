"""The two kinds of layer an expert's ``layers`` hold, as types the fusion graph dispatches on.

* :class:`StepLayer`: a transformer layer split into steps, ``attend(x, layout)`` then
  ``feed_forward(x)``, both ``(B, L, D) → (B, L, D)``; operators act between them (the graph's
  ``replace_attn`` / ``post_attn`` / ``post_mlp`` sites). :class:`~fusionkit.experts.block.Block`
  (every ViT-family expert) and the Swin blocks are step layers.
* :class:`Stage`: one map ``(x, layout) → (x', layout')`` that may change the grid and the width
  (a CNN stage, a Swin patch merging); it runs in the attention phase of its step and has no MLP step.

A plugin expert's layers subclass one of the two; the graph refuses anything else when it is built.
"""

from __future__ import annotations

from torch import Tensor, nn

from fusionkit.attention import TokenLayout


class StepLayer(nn.Module):
    """A layer with an attention step and an MLP step (``forward`` runs both)."""

    def attend(self, x: Tensor, layout: TokenLayout) -> Tensor:
        """Attention step over tokens ``(B, L, D)`` with their layout: ``(B, L, D)``."""
        raise NotImplementedError

    def feed_forward(self, x: Tensor) -> Tensor:
        """MLP step, token-wise: ``(B, L, D)``."""
        raise NotImplementedError

    def forward(self, x: Tensor, layout: TokenLayout) -> Tensor:
        return self.feed_forward(self.attend(x, layout))


class Stage(nn.Module):
    """A layer that maps tokens ``(B, L, D)`` and their layout to new tokens ``(B, L', D')`` and layout."""

    def forward(self, x: Tensor, layout: TokenLayout) -> tuple[Tensor, TokenLayout]:
        raise NotImplementedError


def check_layers(name: str, layers: nn.ModuleList) -> None:
    """Raise ``TypeError`` naming expert ``name``'s first layer that is neither a StepLayer nor a Stage."""
    for i, layer in enumerate(layers):
        if not isinstance(layer, (StepLayer, Stage)):
            raise TypeError(f"expert {name!r}: layers[{i}] is a {type(layer).__name__}, neither a StepLayer "
                            "(attend / feed_forward) nor a Stage ((x, layout) -> (x, layout)); see "
                            "fusionkit.experts.layer")


__all__ = ["Stage", "StepLayer", "check_layers"]

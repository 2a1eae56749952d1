"""``late``: late fusion at the penultimate layer (the CAST paper, Table 1 (b), Figure 7 (a, b); the CA²ST
paper, Table IX). The test-time ensemble of independent experts (Table 1 (a), Table VIII) is
:mod:`fusionkit.engine.ensemble`.

Late fusion exchanges information once, on the representation that feeds the classifiers. It is
an operator (not a head) so that every head keeps reading its own expert (EK100: verb from the
temporal expert, noun from the spatial one) and the heads stay the ones of the compared models.

CA²ST puts "the information exchange in the penultimate layer". Two readings, both recipes:

* ``steps: [-1]`` (what ``cast_late_*`` / ``cava_late_add`` use): site ``post_mlp`` of the last
  layer, right before ``final_norm`` and pooling: the exchange is on the penultimate
  *representation* of the whole network, the one the classifier layer reads;
* ``steps: [-2]`` (the literal one, the override ``fusion.late.steps=[-2]``): after the MLP of
  the penultimate transformer layer; the last layer then runs on the fused tokens.

Every expert ``a`` receives the pooled features ``m_b`` of the other joined experts ``b``
(``m_b``: mean of ``b``'s patch tokens, ``(B, D_b)``, the ``avg`` pool every expert has),
broadcast to all of ``a``'s tokens (patches and extras)::

    add:     Y_a' = Y_a + DropPath( Σ_b W_{b→a} m_b )                  W_{b→a}: D_b → D_a
    concat:  Y_a' = Y_a + DropPath( W_a [Y_a ; m_b1 ; m_b2 ; …] )       W_a: D_a + Σ_b D_b → D_a

``concat`` is the projection of the concatenation written in residual form: ``Y + W[Y; m]``
equals a plain projection ``W'[Y; m]`` with ``W' = W + [I 0]``, the same set of functions, and
with ``W`` zero-initialised (weight and bias) both modes are the identity at init
(``zero_init = True``).

The test-time ensemble is not an operator: a recipe gives every expert its own heads and an
``eval.ensemble`` key naming which heads are averaged (:func:`fusionkit.engine.ensemble.ensemble`), e.g.::

    eval:
      ensemble:
        verb: {heads: [verb_temporal, verb_spatial], combine: softmax}
        noun: {heads: [noun_spatial, noun_temporal], combine: softmax}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from fusionkit.attention import TokenLayout
from fusionkit.fusion.base import FusionOp, SiteState
from fusionkit.registry import FUSIONS

MODES = ("add", "concat")


def pooled(x: Tensor, layout: TokenLayout) -> Tensor:
    """Mean of the patch tokens of ``x`` ``(B, L, D)``: ``(B, D)``."""
    _, patches = layout.split(x)
    return patches.mean(dim=(1, 2))


@FUSIONS.register("late")
class LateFusion(FusionOp):
    """Late fusion (CAST / CAVA baseline): pooled features of the other experts added (projected) or concatenated.

    See the module docstring. Parameters: ``add``: ``proj.<b>_to_<a>.*`` ``(D_a, D_b)``;
    ``concat``: ``proj.<a>.*`` ``(D_a, D_a + Σ_b D_b)``.

    Args:
        experts, dims, layouts: from the graph (at least two experts).
        mode: ``add`` (default) or ``concat``.
        receivers: experts that are updated (default: all joined experts, i.e. bidirectional).
        drop_path: stochastic depth of the update (the graph's rate for this step).
    """

    site = "post_mlp"
    zero_init = True  # the graph is the identity at init (zero projections)

    def __init__(self, *, experts: list[str], dims: Mapping[str, int], layouts: Mapping[str, TokenLayout],
                 drop_path: float = 0.0, mode: str = "add",
                 receivers: Sequence[str] | None = None) -> None:
        super().__init__(experts=experts)
        if mode not in MODES:
            raise ValueError(f"late: unknown mode {mode!r}; valid: {', '.join(MODES)}")
        if len(self.experts) < 2:
            raise ValueError(f"late: needs at least two experts to fuse, got {list(self.experts)}")
        receivers = list(receivers) if receivers is not None else list(self.experts)
        bad = [e for e in receivers if e not in self.experts]
        if bad or not receivers:
            raise ValueError(f"late: receivers {receivers} must be a non-empty subset of the joined experts "
                             f"{list(self.experts)}")
        self.mode = mode
        self.receivers = tuple(receivers)
        self.sources = {a: tuple(b for b in self.experts if b != a) for a in self.receivers}
        self.proj = nn.ModuleDict()
        for a in self.receivers:
            if mode == "add":
                for b in self.sources[a]:
                    self.proj[f"{b}_to_{a}"] = nn.Linear(dims[b], dims[a])
            else:
                self.proj[a] = nn.Linear(dims[a] + sum(dims[b] for b in self.sources[a]), dims[a])
        for m in self.proj.values():
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, state: SiteState) -> dict[str, Tensor]:
        """New tokens ``(B, L_a, D_a)`` of every receiver ``a``."""
        feats = {e: pooled(state.x[e], state.layouts[e]) for e in self.experts}  # (B, D_e)
        out = {}
        for a in self.receivers:
            x = state.x[a]
            if self.mode == "add":
                delta = sum(self.proj[f"{b}_to_{a}"](feats[b]) for b in self.sources[a])[:, None]  # (B, 1, D_a)
            else:
                others = torch.cat([feats[b] for b in self.sources[a]], dim=-1)                   # (B, Σ D_b)
                cat = torch.cat([x, others[:, None].expand(-1, x.shape[1], -1)], dim=-1)       # (B, L_a, D_a + Σ D_b)
                delta = self.proj[a](cat)
            out[a] = x + self.drop_path(delta.expand_as(x))
        return out

    def extra_repr(self) -> str:
        return f"mode={self.mode}, receivers={list(self.receivers)}"


__all__ = ["LateFusion", "pooled"]

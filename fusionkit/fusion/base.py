"""The fusion-operator protocol: what the graph hands an operator at its site, and what it returns.

The fusion graph (:mod:`fusionkit.graph`) runs all experts layer by layer in lockstep. At every
step it calls the operators placed there, at one of three sites:

==============  =========================================================================
replace_attn    instead of the experts' attention step: the operator re-runs the frozen
                attention itself (on regrouped tokens, with prompts) and returns the
                post-attention tokens (AV-STFP, MM-ViT)
post_attn       between attention and MLP (B-CA of CAST / CA²ST, lateral connections)
post_mlp        after the MLP, i.e. after the whole layer (after each stage of a CNN expert)
==============  =========================================================================

An operator is built once per step of its layer range by its registered class, called with
keyword arguments only: the graph's ``experts`` (names it joins), ``dims`` and ``layouts`` (width
and :class:`~fusionkit.attention.TokenLayout` of every joined expert at that step) and
``drop_path`` (the graph's stochastic-depth rate for that step), plus the operator's own options
(the step itself arrives with every call, ``SiteState.step``) from the recipe. The expert never knows which operator it hosts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from fusionkit.attention import TokenLayout

SITES = ("replace_attn", "post_attn", "post_mlp")


@dataclass
class SiteState:
    """What an operator sees at its site.

    Attributes:
        x: tokens ``(B, L_e, D_e)`` of every expert, by name.
        layouts: their layouts.
        layers: the expert layers running at this step (:class:`~fusionkit.experts.layer.StepLayer` or
            :class:`~fusionkit.experts.layer.Stage`; :class:`~fusionkit.experts.block.Block` for ViT-family
            experts), for operators that run or re-run the frozen attention.
        step: the graph step.
        site: the site being run (an operator may act at several, see ``FusionOp.sites``).
        carry: this operator's own dictionary for this step: what it stores at one site it reads at a
            later site of the same step (LAVISH's MLP-parallel updates); the graph drops it after the step,
            so nothing is kept on the module between calls.
    """

    x: dict[str, Tensor]
    layouts: dict[str, TokenLayout]
    layers: dict[str, nn.Module]
    step: int
    site: str = "post_attn"
    carry: dict[str, Any] = field(default_factory=dict)


class FusionOp(nn.Module):
    """Base class of fusion operators (one instance per step of the operator's layer range).

    Subclasses set ``site`` (their default site) and implement :meth:`forward`, returning the new
    tokens of the experts they change (the others are left as they are). An operator that must act
    at several sites of one step (LAVISH: beside the attention and beside the MLP) lists them in
    ``sites`` instead and reads ``state.site``. Two more class attributes
    state what the swap test (every operator in one two-expert graph) may rely on:

    * ``zero_init``: the operator leaves the experts' tokens unchanged at initialisation;
    * ``example``: options that make it build in a small two-expert graph (width 64, 4 heads), and
      ``example_recipe``: a recipe fragment for operators that need other experts or inputs.
    """

    site: str = "post_attn"
    sites: tuple[str, ...] = ()
    zero_init: bool = False
    example: dict = {}
    example_recipe: dict = {}

    def __init__(self, *, experts: Sequence[str]) -> None:
        super().__init__()
        self.experts = tuple(experts)

    def forward(self, state: SiteState) -> dict[str, Tensor]:
        raise NotImplementedError

"""AIM-style bottleneck adapters, attachable to any transformer expert.

``Adapter(x) = W_up · GELU(W_down · x)`` with ``W_down: D → D·ratio`` and ``W_up`` zero-initialised,
so an expert with freshly attached adapters computes exactly what it computed before.
Attached in series on an attention output (``Block.attn_adapter``, added beside the attention
branch) and in parallel to an MLP (``Block.mlp_adapter``, reading the MLP's normalised input,
scaled by ``Block.mlp_adapter_scale``), as in AIM and CAST (CAST eq. 3–5).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor, nn


class Adapter(nn.Module):
    """Bottleneck ``Linear(D, D·ratio) → GELU → Linear(D·ratio, D)``, up-projection zero at init.

    Parameter names (``D_fc1``, ``D_fc2``) follow AIM / CAST so their checkpoints map one to one.
    Input and output ``(..., D)``.
    """

    def __init__(self, dim: int, ratio: float = 0.25) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        if hidden < 1:
            raise ValueError(f"adapter ratio {ratio} gives an empty bottleneck for width {dim}")
        self.D_fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.D_fc2 = nn.Linear(hidden, dim)
        nn.init.trunc_normal_(self.D_fc1.weight, std=0.02)
        nn.init.zeros_(self.D_fc1.bias)
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.D_fc2(self.act(self.D_fc1(x)))


def attach_adapters(expert: nn.Module, *, attn: bool = True, mlp: bool = True, ratio: float = 0.25,
                    mlp_scale: float = 0.5, layers: Iterable[int] | None = None,
                    drop_path: float | Sequence[float] = 0.0) -> list[Adapter]:
    """Attach adapters to the transformer layers of ``expert`` (all layers unless ``layers``).

    Args:
        expert: an expert whose ``layers`` are :class:`~fusionkit.experts.block.Block`.
        attn: add an adapter in series on each attention output.
        mlp: add an adapter in parallel to each MLP, scaled by ``mlp_scale``.
        ratio: bottleneck width as a fraction of the layer width.
        layers: indices of the layers to adapt (negative indices count from the end).
        drop_path: stochastic depth of the MLP adapter branch, one rate for all layers or one per
            layer of the expert (CAST: a linear schedule up to 0.2; the attention adapter has none).

    Returns:
        The new adapters (trainable; the rest of the expert keeps its ``requires_grad``).
    """
    from fusionkit.experts.block import Block

    from timm.layers import DropPath

    blocks = list(expert.layers)
    rates = [float(drop_path)] * len(blocks) if isinstance(drop_path, (int, float)) else list(drop_path)
    if len(rates) != len(blocks):
        raise ValueError(f"drop_path has {len(rates)} rates for an expert of {len(blocks)} layers")
    chosen = range(len(blocks)) if layers is None else [i % len(blocks) for i in layers]
    new = []
    for i in chosen:
        block = blocks[i]
        if not isinstance(block, Block):
            raise TypeError(f"layer {i} of {type(expert).__name__} is a {type(block).__name__}, not a transformer "
                            "Block: adapters attach to attention/MLP layers only")
        if attn:
            block.attn_adapter = Adapter(block.dim, ratio)
            new.append(block.attn_adapter)
        if mlp:
            block.mlp_adapter = Adapter(block.dim, ratio)
            block.mlp_adapter_scale = mlp_scale
            block.adapter_drop_path = DropPath(rates[i]) if rates[i] > 0 else nn.Identity()
            new.append(block.mlp_adapter)
    return new

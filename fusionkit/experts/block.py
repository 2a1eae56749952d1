"""The transformer layer every ViT-family expert is made of, exposed as steps.

``Block.forward`` is the usual pre-norm layer; the fusion graph instead calls its steps so that
operators can act between them::

    x = block.attend(x, layout)        # x + MHSA(LN1 x) [+ adapter in series on the MHSA output]

(as in the official CAST code, stochastic depth of the adapters applies to the MLP adapter only:
``adapter_drop_path``, set by :func:`~fusionkit.adapters.attach_adapters`)
    ... operators at the "post_attn" site ...
    x = block.feed_forward(x)          # x + FFN(LN2 x) [+ s · adapter(LN2 x) in parallel]
    ... operators at the "post_mlp" site ...

Operators that re-run the frozen attention on regrouped tokens (AV-STFP, MM-ViT) call
``block.norm1`` and ``block.attn(h, kv=...)`` with a window of their own
(:func:`fusionkit.attention.windowed`) and hand the result to ``block.attention_residual(x, out)``,
the one place that adds layer scale, stochastic depth and the serial adapter (``Block.attend`` uses
it too). Children use timm's names (norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2).
"""

from __future__ import annotations

from torch import Tensor, nn

from fusionkit.attention import Attention, TokenLayout, Window, make_window, windowed
from fusionkit.experts.layer import StepLayer


class Block(StepLayer):
    """Pre-norm transformer layer over ``(B, L, D)`` tokens attending within ``window``.

    Args:
        dim: width ``D``.
        attn: the multi-head attention (:class:`~fusionkit.attention.Attention`).
        mlp: the feed-forward network ``(…, D) → (…, D)``.
        norm1, norm2: the pre-norms.
        window: the expert's own attention window (``space`` for an image model applied per frame,
            ``global`` for a video or audio model).
        ls1, ls2: layer scales (identity when the model has none).
        drop_path: stochastic-depth probability of the residual branches.
    """

    def __init__(self, dim: int, attn: Attention, mlp: nn.Module, norm1: nn.Module, norm2: nn.Module,
                 window: str | Window = "global", ls1: nn.Module | None = None, ls2: nn.Module | None = None,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        from timm.layers import DropPath

        self.dim = dim
        self.window = make_window(window)
        self.norm1 = norm1
        self.attn = attn
        self.ls1 = ls1 or nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm2
        self.mlp = mlp
        self.ls2 = ls2 or nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn_adapter: nn.Module | None = None
        self.mlp_adapter: nn.Module | None = None
        self.mlp_adapter_scale = 1.0
        self.adapter_drop_path: nn.Module = nn.Identity()

    def attention_residual(self, x: Tensor, out: Tensor) -> Tensor:
        """The attention step's residual around an attention output ``out`` ``(B, L, D)`` (before the layer
        scale): ``x + DropPath(a) [+ ADAP(a)]`` with ``a = ls1(out)``, ``(B, L, D)``."""
        a = self.ls1(out)
        x = x + self.drop_path1(a)
        if self.attn_adapter is not None:
            x = x + self.attn_adapter(a)
        return x

    def attend(self, x: Tensor, layout: TokenLayout) -> Tensor:
        """Attention step: ``x + MHSA(LN1 x) [+ ADAP(MHSA(LN1 x))]`` within the block's window, ``(B, L, D)``."""
        return self.attention_residual(x, windowed(self.attn, self.norm1(x), layout, self.window))

    def feed_forward(self, x: Tensor) -> Tensor:
        """MLP step: ``x + FFN(LN2 x) [+ DropPath(s · ADAP(LN2 x))]``, ``(B, L, D)``."""
        h = self.norm2(x)
        out = x + self.drop_path2(self.ls2(self.mlp(h)))
        if self.mlp_adapter is not None:
            out = out + self.adapter_drop_path(self.mlp_adapter_scale * self.mlp_adapter(h))
        return out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window={self.window.name}"

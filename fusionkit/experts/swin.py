"""``timm_swin``: a timm Swin Transformer V2 applied to each frame of a clip (LAVISH's best backbone).

Swin-V2 is hierarchical: stage ``s`` starts with a patch merging (2×2 neighbouring patches
concatenated, ``Linear(4C, 2C)`` + LayerNorm: the grid halves, the width doubles) and then runs
its blocks at that resolution. In timm 1.0.31 the merging is the *first* module of
``SwinTransformerV2Stage`` (``downsample`` before ``blocks``; stage 0 has none). fusionkit's
layers follow that order, one layer per module::

    block 0 … block d0-1 | merge, block … | merge, block … | merge, block …

* a **merge** layer has no attention step: like a CNN stage it maps ``(x, layout) → (x, layout')``,
  so the graph updates the layout (``T·H·W → T·H/2·W/2``) and the width of the following steps;
* a **block** layer exposes ``attend(x, layout)`` / ``feed_forward(x)``. Swin-V2 is res-post-norm::

      x = x + drop_path1(norm1(attn(x)))       # windowed, shifted, cosine attention + log-CPB bias
      x = x + drop_path2(norm2(mlp(x)))

  The windowed cosine attention with its relative position bias stays inside timm's block
  (``block._attn`` on ``(B·T, H, W, C)``): it is Swin's own kernel (windows, shifts, masks, a
  learned logit scale), not fusionkit's scaled-dot-product entry point, so it is reused rather
  than re-implemented; operators never re-run it, they act around the steps.

Swin-V2-L (depths 2, 2, 18, 2) therefore has 27 layers: 24 blocks and 3 merges (at layers 2, 5
and 24); ``block_layers`` lists the block indices (e.g. for an operator's ``steps``). Tokens are
``(B, T·H·W, C)`` without extras; ``final_norm`` is timm's last LayerNorm and the pool is ``avg``
(timm's head pools the normed map the same way).
"""

from __future__ import annotations

from typing import Any

from einops import rearrange
from torch import Tensor, nn

from fusionkit.attention import TokenLayout
from fusionkit.experts.base import Expert, FrameSelect, Tokens
from fusionkit.experts.layer import StepLayer
from fusionkit.experts.timm_cnn import GridStage
from fusionkit.experts.timm_vit import create_timm_model, frame_select_of
from fusionkit.registry import EXPERTS


class SwinBlock(StepLayer):
    """A timm ``SwinTransformerV2Block`` as fusionkit steps over ``(B, T·H·W, C)`` tokens.

    Children keep timm's names (``norm1``, ``attn``, ``drop_path1``, ``norm2``, ``mlp``,
    ``drop_path2``) so timm checkpoints load unchanged; ``norm1`` / ``norm2`` are post-norms.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.dim = block.dim

    def attend(self, x: Tensor, layout: TokenLayout) -> Tensor:
        """``x + DropPath(LN1(W-MSA(x)))`` per frame (shifted windows inside timm's block), ``(B, L, C)``."""
        if layout.extras:
            raise ValueError(f"timm_swin blocks take patch tokens only, got {layout}")
        grid = rearrange(x, "b (t h w) c -> (b t) h w c", t=layout.t, h=layout.h, w=layout.w)
        out = self.block.drop_path1(self.block.norm1(self.block._attn(grid)))
        return x + rearrange(out, "(b t) h w c -> b (t h w) c", t=layout.t)

    def feed_forward(self, x: Tensor) -> Tensor:
        """``x + DropPath(LN2(MLP(x)))``, token-wise, ``(B, L, C)``."""
        return x + self.block.drop_path2(self.block.norm2(self.block.mlp(x)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window={tuple(self.block.window_size)}, shift={tuple(self.block.shift_size)}"


class SwinMerge(GridStage):
    """timm's ``PatchMerging`` over tokens: ``(B, T·H·W, C)`` → ``(B, T·⌈H/2⌉·⌈W/2⌉, 2C)`` and the new layout."""

    def __init__(self, merge: nn.Module) -> None:
        super().__init__(merge, merge.out_dim, channels_last=True)

    @property
    def merge(self) -> nn.Module:
        return self.body


@EXPERTS.register("timm_swin")
class TimmSwin(Expert):
    """A timm Swin Transformer V2 per frame; its layers are the Swin blocks and patch mergings.

    Args:
        name: timm model name (``swinv2_large_window12_192.ms_in22k``, ``swinv2_tiny_window8_256``, ...).
        pretrained: ``None`` (random init), a local weight file in timm's layout, or ``True`` / a hub
            tag to download (online machines only).
        frame_select: which frames of the clip it sees (:class:`FrameSelect` or ``{stride, offset, num}``).
        drop_path: stochastic depth of the blocks.
        frozen: freeze every parameter (default).
        modality: batch key read (``video``; a ``shared`` stream borrows the layers for audio).
        **kwargs: passed to ``timm.create_model`` (``img_size``, ``window_size``, ``embed_dim``,
            ``depths``, ``num_heads``, ...).

    Tokens after layer ``i``: ``(B, T·H_i·W_i, C_i)``, no extras; ``dims`` gives ``C_i``.
    """

    def __init__(self, name: str = "swinv2_large_window12_192.ms_in22k", pretrained: str | bool | None = None,
                 frame_select: FrameSelect | dict[str, Any] | None = None, drop_path: float = 0.0,
                 frozen: bool = True, modality: str = "video", **kwargs: Any) -> None:
        swin = create_timm_model(name, pretrained, "timm_swin", num_classes=0, drop_path_rate=drop_path, **kwargs)
        if not hasattr(swin, "layers") or not all(hasattr(s, "blocks") for s in swin.layers):
            raise ValueError(f"timm_swin: {name!r} is not a timm Swin Transformer V2 (no stages with blocks)")
        super().__init__(modality, "avg")
        self.patch_embed = swin.patch_embed
        layers: list[nn.Module] = []
        for stage in swin.layers:
            if not isinstance(stage.downsample, nn.Identity):
                layers.append(SwinMerge(stage.downsample))
            layers.extend(SwinBlock(b) for b in stage.blocks)
        self.layers = nn.ModuleList(layers)
        self.dims = [layer.dim for layer in layers]
        self.block_layers = [i for i, layer in enumerate(layers) if isinstance(layer, SwinBlock)]
        self.final_norm = swin.norm  # registered once, here
        self.frame_select = frame_select_of(frame_select)
        self.img_size = tuple(swin.patch_embed.img_size)
        if frozen:
            self.freeze()

    def no_weight_decay(self) -> set[str]:
        """As timm's Swin-V2 declares them: the continuous position bias MLPs and the attention logit scales
        (``logit_scale`` is ``(heads, 1, 1)``, so the 1-D rule alone would decay it)."""
        return {n for n, _ in self.named_parameters() if "cpb_mlp" in n or "logit_scale" in n}

    def embed(self, inputs: Tensor) -> Tokens:
        """Video ``(B, 3, T, H, W)`` (frames selected) or image ``(B, 3, H, W)`` to patch tokens."""
        video = self.frame_select(inputs) if inputs.dim() == 5 else inputs[:, :, None]
        b = video.shape[0]
        x = self.patch_embed(rearrange(video, "b c t h w -> (b t) c h w"))  # (B·T, H, W, C)
        layout = TokenLayout(video.shape[2], x.shape[1], x.shape[2])
        return Tokens(rearrange(x, "(b t) h w c -> b (t h w) c", b=b), layout)


__all__ = ["SwinBlock", "SwinMerge", "TimmSwin"]

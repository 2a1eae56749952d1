"""``timm_cnn``: a timm CNN (ResNet, ConvNeXt, ...) applied per frame, one layer per stage."""

from __future__ import annotations

from typing import Any

from einops import rearrange
from torch import Tensor, nn

from fusionkit.attention import TokenLayout
from fusionkit.experts.base import Expert, FrameSelect, Tokens
from fusionkit.experts.layer import Stage
from fusionkit.experts.timm_vit import create_timm_model, frame_select_of
from fusionkit.registry import EXPERTS


class GridStage(Stage):
    """A module over a grid, applied to tokens: ``(B, T·H·W, C)`` → feature maps → ``body`` → ``(B, T·H'·W', C')``.

    CNN stages take channels-first maps ``(B·T, C, H, W)``; ``channels_last=True`` hands ``body``
    ``(B·T, H, W, C)`` (timm's Swin patch merging). The new layout follows the output grid.
    """

    def __init__(self, body: nn.Module, dim: int, channels_last: bool = False) -> None:
        super().__init__()
        self.body = body
        self.dim = dim
        self.pattern = "(b t) h w c" if channels_last else "(b t) c h w"

    def forward(self, x: Tensor, layout: TokenLayout) -> tuple[Tensor, TokenLayout]:
        fmap = self.body(rearrange(x, f"b (t h w) c -> {self.pattern}", t=layout.t, h=layout.h, w=layout.w))
        h, w = (fmap.shape[1], fmap.shape[2]) if self.pattern.endswith("c") else (fmap.shape[2], fmap.shape[3])
        return rearrange(fmap, f"{self.pattern} -> b (t h w) c", t=layout.t), TokenLayout(layout.t, h, w)


@EXPERTS.register("timm_cnn")
class TimmCNN(Expert):
    """Any timm CNN with per-stage features (ResNet, ConvNeXt), per frame; one layer per stage.

    Args:
        name: timm model name (``resnet50``, ``resnet18``, ``convnext_tiny``, ...).
        pretrained: ``None``, a local weight file in timm's layout, or ``True`` (online only).
        frame_select: which frames of the clip it sees (:class:`FrameSelect` or ``{stride, offset, num}``).
        num_stages: the last ``num_stages`` entries of timm's ``feature_info`` become the layers
            (4 for ResNets: ``layer1`` … ``layer4``); everything before them is the stem.
        frozen: freeze all parameters and keep BatchNorm statistics fixed (eval mode) in training.

    Tokens after layer ``i``: ``(B, T·H_i·W_i, C_i)``, no extras (``dims`` = stage widths, e.g.
    256/512/1024/2048 for ResNet-50). A stage runs in the graph's attention phase, so operators at ``post_attn`` / ``post_mlp`` of
    that step see the stage's output.
    """

    def __init__(self, name: str = "resnet50", pretrained: str | bool | None = None,
                 frame_select: FrameSelect | dict[str, Any] | None = None, num_stages: int = 4,
                 frozen: bool = True, modality: str = "video", **kwargs: Any) -> None:
        cnn = create_timm_model(name, pretrained, "timm_cnn", num_classes=0, **kwargs)
        super().__init__(modality, "avg")
        info = cnn.feature_info[-num_stages:]
        first = info[0]["module"].split(".")[0]
        children = dict(cnn.named_children())
        stem_names = list(children)[: list(children).index(first)]
        self.stem = nn.Sequential(*(children[n] for n in stem_names))
        self.layers = nn.ModuleList(GridStage(cnn.get_submodule(i["module"]), i["num_chs"]) for i in info)
        self.dims = [i["num_chs"] for i in info]
        self.frame_select = frame_select_of(frame_select)
        self.frozen = frozen
        if frozen:
            self.freeze()

    def embed(self, inputs: Tensor) -> Tokens:
        """Video ``(B, 3, T, H, W)`` or image ``(B, 3, H, W)`` through the stem: ``(B, T·h·w, C_stem)``."""
        video = self.frame_select(inputs) if inputs.dim() == 5 else inputs[:, :, None]
        t = video.shape[2]
        fmap = self.stem(rearrange(video, "b c t h w -> (b t) c h w"))
        layout = TokenLayout(t, fmap.shape[2], fmap.shape[3])
        return Tokens(rearrange(fmap, "(b t) c h w -> b (t h w) c", t=t), layout)

    def train(self, mode: bool = True) -> TimmCNN:
        """Like ``nn.Module.train``, but a frozen CNN keeps its BatchNorm layers in eval mode."""
        super().train(mode)
        if self.frozen:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

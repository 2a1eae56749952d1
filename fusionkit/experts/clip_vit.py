"""``clip_vit``: an open_clip (OpenAI / LAION) CLIP vision transformer, applied to each frame of a clip.

The tower is built by open_clip (random init, a local checkpoint or a hub tag), then converted:
every ``ResidualAttentionBlock`` becomes a fusionkit :class:`~fusionkit.experts.block.Block` whose
attention (the ``nn.MultiheadAttention`` fused ``in_proj``) runs through fusionkit's kernels, with a
``space`` window (each frame attends within itself, its CLS included). The stem (``conv1``,
``class_embedding``, ``positional_embedding``, ``ln_pre``) and ``ln_post`` stay as the expert's own
children; the image projection ``proj`` is kept only with ``project=True`` (CAST drops it).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from fusionkit.attention import Attention, TokenLayout
from fusionkit.experts.base import Expert, FrameSelect, Tokens
from fusionkit.experts.block import Block
from fusionkit.experts.pretrained import PretrainedError, is_local_file, require_online
from fusionkit.experts.timm_vit import frame_select
from fusionkit.registry import EXPERTS


def attention_from_mha(mha: nn.MultiheadAttention) -> Attention:
    """A fusionkit :class:`Attention` sharing the weights of a self-attention ``nn.MultiheadAttention``
    (``qkv`` = ``in_proj_weight``/``in_proj_bias``, ``proj`` = ``out_proj``)."""
    if not isinstance(mha, nn.MultiheadAttention):
        raise ValueError(f"expected nn.MultiheadAttention, got {type(mha).__name__}")
    if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        raise ValueError("nn.MultiheadAttention with separate q/k/v projections (kdim/vdim != embed_dim) "
                         "is not supported")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
    dim = mha.embed_dim
    new = Attention(dim, mha.num_heads, qkv_bias=mha.in_proj_bias is not None, attn_drop=mha.dropout)
    new.qkv.weight = mha.in_proj_weight
    if mha.in_proj_bias is not None:
        new.qkv.bias = mha.in_proj_bias
    new.proj.weight = mha.out_proj.weight
    new.proj.bias = mha.out_proj.bias  # None when the MHA has no bias
    return new


def block_from_open_clip(block: nn.Module, window: str = "space", drop_path: float = 0.0) -> Block:
    """Wrap an open_clip ``ResidualAttentionBlock`` as a fusionkit :class:`Block` (children reused)."""
    from open_clip.transformer import ResidualAttentionBlock

    if type(block) is not ResidualAttentionBlock:
        raise ValueError(
            f"open_clip block {type(block).__name__} is not supported: clip_vit converts the default "
            "ResidualAttentionBlock only (no custom blocks: qk_norm, scaled cosine attention, scale_heads, "
            "scale_attn(_inner), scale_fc)")
    if hasattr(block, "ln_1_kv"):
        raise ValueError("open_clip cross-attention blocks are not supported")
    dim = block.attn.embed_dim
    return Block(dim, attention_from_mha(block.attn), block.mlp, block.ln_1, block.ln_2, window=window,
                 ls1=block.ls_1, ls2=block.ls_2, drop_path=drop_path)


def _check_supported(visual: nn.Module, name: str) -> None:
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"clip_vit {name!r}: the vision tower is a {type(visual).__name__}, not an open_clip "
                         "VisionTransformer (timm-backed and ResNet towers are not supported)")
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError(f"clip_vit {name!r}: the attentional pooler (attentional_pool) is not supported")
    if not isinstance(visual.patch_dropout, nn.Identity):
        raise ValueError(f"clip_vit {name!r}: patch dropout (patch_dropout={visual.patch_dropout.prob}) is not "
                         "supported; build with patch_dropout=0")
    if visual.pool_type not in ("tok", "avg"):
        raise ValueError(f"clip_vit {name!r}: open_clip pool_type={visual.pool_type!r} is not supported "
                         "(only 'tok' and 'avg')")


@EXPERTS.register("clip_vit")
class ClipViT(Expert):
    """open_clip CLIP ViT image tower by name, applied per frame (CAST's spatial expert).

    Args:
        name: open_clip model name (``ViT-B-16``, ``ViT-L-14``, ``ViT-B-16-quickgelu``, ...).
        pretrained: ``None`` (random init), a local checkpoint file (open_clip or OpenAI layout, loaded
            by open_clip itself; pass ``quick_gelu=True`` for OpenAI weights), or an open_clip hub tag
            (``"openai"``, ``"laion2b_s34b_b88k"``, ...; online machines only).
        frames: frame selection (:class:`FrameSelect` or ``{stride, offset, num}``).
        project: keep the image projection ``proj``; :meth:`pool` then returns
            ``ln_post(feature) @ proj`` (``output_dim`` wide). ``False`` (default) removes it.
        quick_gelu: force QuickGELU (``True``) or GELU (``False``) in the MLPs; ``None`` follows
            open_clip: the model name (``-quickgelu``) or, for a hub tag, the tag's own setting.
        img_size: input size override (open_clip's ``force_image_size``); position embeddings of a
            checkpoint for another size are interpolated by open_clip when loading.
        pool: ``"cls"`` / ``"avg"``; default follows the tower's ``pool_type`` (``tok`` -> ``cls``).
        drop_path: stochastic depth of the blocks (linearly increasing to this value).
        frozen: freeze every parameter (default).
        **kwargs: passed to ``open_clip.create_model`` as model overrides (``vision_cfg``,
            ``text_cfg``, ``embed_dim``, ...).

    Tokens: ``(B, T·(1 + H·W), D)``, frame-major with each frame's CLS first; window ``space``.
    Clip feature (``pool="cls"``): ``ln_post(mean over frames of CLS)`` [``@ proj``].
    """

    def __init__(self, name: str = "ViT-B-16", pretrained: str | None = None,
                 frames: FrameSelect | dict[str, Any] | None = None, project: bool = False,
                 quick_gelu: bool | None = None, img_size: int | tuple[int, int] | None = None,
                 pool: str | None = None, drop_path: float = 0.0, frozen: bool = True, modality: str = "video",
                 **kwargs: Any) -> None:
        visual = self._build_visual(name, pretrained, quick_gelu, img_size, kwargs)
        _check_supported(visual, name)
        avg = visual.pool_type == "avg"
        super().__init__(modality, pool or ("avg" if avg else "cls"))
        self.name = name
        self.frames = frame_select(frames)
        self.patch_size = tuple(visual.patch_size)
        self.image_size = tuple(visual.image_size)
        self.grid_size = tuple(visual.grid_size)
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.ln_pre = visual.ln_pre
        resblocks = visual.transformer.resblocks
        rates = torch.linspace(0, drop_path, len(resblocks)).tolist() if drop_path > 0 else [0.0] * len(resblocks)
        self.blocks = nn.ModuleList(block_from_open_clip(b, "space", r) for b, r in zip(resblocks, rates))
        self.project = project
        if project:
            if visual.proj is None:
                raise ValueError(f"clip_vit {name!r}: project=True but the tower has no proj")
            self.proj = visual.proj
        else:
            self.register_parameter("proj", None)
        self.output_dim = visual.proj.shape[1] if project else visual.transformer.width
        self.dims = [visual.transformer.width] * len(self.blocks)
        # ln_post is registered once, as final_norm or pool_norm (see the `ln_post` property)
        if avg and not visual.final_ln_after_pool:
            # open_clip normalises every token, then averages the patches
            self.final_norm = visual.ln_post
        else:
            # LN of the pooled feature (CAST: LN_post of the mean over frames of the CLS tokens)
            self.pool_norm = visual.ln_post
        if frozen:
            self.freeze()

    @staticmethod
    def _build_visual(name: str, pretrained: str | None, quick_gelu: bool | None,
                      img_size: int | tuple[int, int] | None, kwargs: dict[str, Any]) -> nn.Module:
        import open_clip

        create: dict[str, Any] = dict(kwargs)
        what = f"clip_vit {name!r}"
        if pretrained is True:
            raise PretrainedError(f"{what}: pretrained=True is ambiguous; pass an open_clip tag "
                                  f"({', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none known'}) "
                                  "or a local checkpoint file")
        hub = False
        if pretrained:
            pretrained = str(pretrained)
            if is_local_file(pretrained):
                if not os.path.isfile(pretrained):
                    raise PretrainedError(f"{what}: pretrained weight file {pretrained!r} does not exist")
            else:
                tags = open_clip.list_pretrained_tags_by_model(name)
                if pretrained not in tags and not open_clip.get_pretrained_cfg(name, pretrained):
                    raise PretrainedError(f"{what}: pretrained={pretrained!r} is neither a local file nor an "
                                          f"open_clip tag of this model (tags: {', '.join(tags) or 'none'})")
                require_online(pretrained, what)
                hub = True
                if quick_gelu is None:
                    quick_gelu = bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
        if quick_gelu is True:
            create["force_quick_gelu"] = True
        elif quick_gelu is False:
            create["quick_gelu"] = False  # model override (open_clip has no "force GELU" flag)
        if img_size is not None:
            create["force_image_size"] = img_size
            if "vision_cfg" in create:  # a vision_cfg override replaces the config force_image_size edits
                create["vision_cfg"] = {**create["vision_cfg"], "image_size": img_size}
        try:
            with contextlib.nullcontext() if pretrained else _quiet_root_logger():
                # random init is what pretrained=None asks for: drop open_clip's warning about it
                model = open_clip.create_model(name, pretrained=pretrained or None, **create)
        except Exception as err:
            if pretrained:
                source = "hub tag" if hub else "file"
                raise PretrainedError(f"{what}: cannot load pretrained {source} {pretrained!r}: {err}") from err
            raise
        return model.visual

    @property
    def ln_post(self) -> nn.Module:
        """CLIP's final LayerNorm (registered as ``pool_norm``, or ``final_norm`` for avg pooling)."""
        return self.final_norm if isinstance(self.pool_norm, nn.Identity) else self.pool_norm

    @property
    def layers(self) -> nn.ModuleList:  # type: ignore[override]
        return self.blocks

    def embed(self, inputs: Tensor) -> Tokens:
        """Video ``(B, 3, T, H, W)`` (frames selected) or image ``(B, 3, H, W)`` to tokens."""
        if inputs.dim() not in (4, 5):
            raise ValueError(f"clip_vit expects video (B, 3, T, H, W) or image (B, 3, H, W), "
                             f"got shape {tuple(inputs.shape)}")
        video = self.frames(inputs) if inputs.dim() == 5 else inputs[:, :, None]
        b, t = video.shape[0], video.shape[2]
        x = self.conv1(rearrange(video, "b c t h w -> (b t) c h w"))
        gh, gw = x.shape[-2:]
        if gh * gw + 1 != self.positional_embedding.shape[0]:
            raise ValueError(
                f"clip_vit {self.name!r}: input frames of {tuple(video.shape[-2:])} give a {gh}x{gw} patch grid, "
                f"but the position embedding is for {self.image_size} ({self.grid_size[0]}x{self.grid_size[1]} "
                f"patches); resize the input or build with img_size={tuple(video.shape[-2:])}")
        x = rearrange(x, "n d h w -> n (h w) d")
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        layout = TokenLayout(t, gh, gw, extras=1, per_frame_extras=True)
        return Tokens(rearrange(x, "(b t) s d -> b (t s) d", b=b), layout)

    def pool(self, tokens: Tokens, mode: str | None = None) -> Tensor:
        """Clip feature: reduce (``mode``), ``ln_post``, then ``@ proj`` when ``project=True``."""
        feat = super().pool(tokens, mode)
        return feat @ self.proj if self.proj is not None else feat


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)

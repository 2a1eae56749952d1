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
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from fusionkit.attention import Attention, TokenLayout
from fusionkit.experts.base import Expert, FrameSelect, Tokens
from fusionkit.experts.block import Block
from fusionkit.experts.pretrained import PretrainedError, is_local_file, load_into, read_state_dict, require_online
from fusionkit.experts.quick_gelu import QuickGELU
from fusionkit.experts.timm_vit import frame_select_of
from fusionkit.logs import quiet
from fusionkit.registry import EXPERTS

_log = logging.getLogger(__name__)


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
    """Wrap an open_clip ``ResidualAttentionBlock`` as a fusionkit :class:`Block` (children reused; an open_clip
    ``QuickGELU`` in the MLP becomes fusionkit's, same forward, one-pass backward)."""
    from open_clip.transformer import QuickGELU as OpenClipQuickGELU
    from open_clip.transformer import ResidualAttentionBlock

    if type(block) is not ResidualAttentionBlock:
        raise ValueError(
            f"open_clip block {type(block).__name__} is not supported: clip_vit converts the default "
            "ResidualAttentionBlock only (no custom blocks: qk_norm, scaled cosine attention, scale_heads, "
            "scale_attn(_inner), scale_fc)")
    if hasattr(block, "ln_1_kv"):
        raise ValueError("open_clip cross-attention blocks are not supported")
    dim = block.attn.embed_dim
    if type(getattr(block.mlp, "gelu", None)) is OpenClipQuickGELU:
        block.mlp.gelu = QuickGELU()
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


def _source_kind(name: str, pretrained: Any, what: str) -> str | None:
    """``None`` (random init), ``"file"``, ``"folder"`` or ``"hub tag"``; an unusable value fails here."""
    import open_clip

    if pretrained is True:
        raise PretrainedError(f"{what}: pretrained=True is ambiguous; pass an open_clip tag "
                              f"({', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none known'}) "
                              "or a local checkpoint file or folder")
    if not pretrained:
        return None
    pretrained = str(pretrained)
    if is_local_file(pretrained):
        if not os.path.exists(pretrained):
            raise PretrainedError(f"{what}: pretrained weight file {pretrained!r} does not exist")
        return "folder" if os.path.isdir(pretrained) else "file"
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags and not open_clip.get_pretrained_cfg(name, pretrained):
        raise PretrainedError(f"{what}: pretrained={pretrained!r} is neither a local file nor an "
                              f"open_clip tag of this model (tags: {', '.join(tags) or 'none'})")
    require_online(pretrained, what)
    return "hub tag"


def stated_quick_gelu(name: str, pretrained: str | None, hub: bool) -> tuple[bool, str] | None:
    """What the weights say about their activation, ``(quick_gelu, where it is said)``, or ``None``.

    A hub tag says it in open_clip's pretrained table (``quick_gelu`` absent: GELU); a local file or
    folder says it through the ``model_cfg`` of an ``open_clip_config.json`` (or ``config.json``) in
    the folder or beside the file (``model_cfg.quick_gelu`` absent: GELU, as open_clip builds it).
    """
    import open_clip

    if not pretrained:
        return None
    if hub:
        return bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False)), \
            f"open_clip pretrained tag {pretrained!r}"
    folder = Path(pretrained) if os.path.isdir(pretrained) else Path(pretrained).parent
    for config in (folder / "open_clip_config.json", folder / "config.json"):
        model_cfg = _read_json(config).get("model_cfg") if config.is_file() else None
        if isinstance(model_cfg, dict):
            return bool(model_cfg.get("quick_gelu", False)), f"{str(config)!r} (model_cfg.quick_gelu)"
    return None


def resolve_quick_gelu(name: str, pretrained: str | None, hub: bool, quick_gelu: bool | None,
                       what: str) -> bool | None:
    """The ``quick_gelu`` to build with: the recipe's, else the model name's, else the weights'.

    A recipe value that contradicts the model name (``-quickgelu``) or the weights' own statement
    (:func:`stated_quick_gelu`) raises :class:`PretrainedError`; weights that state nothing (a bare
    state dict) are loaded with the recipe's choice and one warning that it could not be verified.
    """
    import open_clip

    named = (open_clip.get_model_config(name) or {}).get("quick_gelu")  # True for the -quickgelu names
    if quick_gelu is not None and named is not None and bool(named) != quick_gelu:
        raise PretrainedError(f"{what}: experts.<name>.quick_gelu is {_yaml(quick_gelu)} but the model name "
                              f"{name!r} uses QuickGELU (quick_gelu: true); drop the key or the -quickgelu suffix")
    wanted = quick_gelu if quick_gelu is not None else named
    stated = stated_quick_gelu(name, pretrained, hub)
    if stated is None:
        if pretrained:
            _log.warning("%s: pretrained %r does not state its activation (no hub tag, no open_clip_config.json), "
                         "so QuickGELU vs GELU cannot be verified; using %s (experts.<name>.quick_gelu: %s)",
                         what, pretrained, _activation(bool(wanted)), _yaml(bool(wanted)))
        return quick_gelu
    if wanted is not None and bool(wanted) != stated[0]:
        source, fix = ((f"the model name {name!r}", "use the name without -quickgelu") if quick_gelu is None else
                       ("experts.<name>.quick_gelu", f"set experts.<name>.quick_gelu: {_yaml(stated[0])}"))
        raise PretrainedError(
            f"{what}: {stated[1]} says the weights were trained with {_activation(stated[0])} (quick_gelu: "
            f"{_yaml(stated[0])}) but {source} asks for {_activation(bool(wanted))} (quick_gelu: "
            f"{_yaml(bool(wanted))}); {fix}")
    return stated[0]


def _activation(quick_gelu: bool) -> str:
    return "QuickGELU" if quick_gelu else "GELU"


def _yaml(value: bool) -> str:
    return "true" if value else "false"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PretrainedError(f"cannot read {str(path)!r}: {type(err).__name__}: {err}") from err
    return data if isinstance(data, dict) else {}


def _load_folder(model: nn.Module, folder: str, what: str) -> None:
    """Load a full open_clip CLIP state dict from a Hugging Face folder (shards merged) into ``model``;
    position embeddings for another image size are interpolated as open_clip does for a file."""
    from open_clip.model import resize_pos_embed

    state_dict = read_state_dict(folder)
    resize_pos_embed(state_dict, model)
    load_into(model, state_dict, f"{what} pretrained folder {folder!r}")


@EXPERTS.register("clip_vit")
class ClipViT(Expert):
    """open_clip CLIP ViT image tower by name, applied per frame (CAST's spatial expert).

    Args:
        name: open_clip model name (``ViT-B-16``, ``ViT-L-14``, ``ViT-B-16-quickgelu``, ...).
        pretrained: ``None`` (random init), a local checkpoint file (open_clip or OpenAI layout, loaded
            by open_clip itself; pass ``quick_gelu=True`` for OpenAI weights), a Hugging Face
            ``save_pretrained`` folder holding an open_clip state dict (one file or shards with their
            index, read by :func:`~fusionkit.experts.pretrained.read_hf_folder`), or an open_clip hub
            tag (``"openai"``, ``"laion2b_s34b_b88k"``, ...; online machines only).
        frame_select: which frames of the clip it sees (:class:`FrameSelect` or ``{stride, offset, num}``).
        project: keep the image projection ``proj``; :meth:`pool` then returns
            ``ln_post(feature) @ proj`` (``output_dim`` wide). ``False`` (default) removes it.
        quick_gelu: QuickGELU (``True``) or GELU (``False``) in the MLPs; ``None`` follows the model
            name (``-quickgelu``), else what the weights state. Weights trained with the other
            activation load without a shape error but give features off by ~4e-2, so the choice is
            checked against every source that states it: the model name, the hub tag (open_clip's
            pretrained table) and the ``model_cfg.quick_gelu`` of an ``open_clip_config.json`` (or
            ``config.json``) in the folder or beside the file. A contradiction raises
            :class:`PretrainedError`; a bare state dict states nothing, so it loads with the chosen
            activation and one logged warning that it could not be verified.
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
                 frame_select: FrameSelect | dict[str, Any] | None = None, project: bool = False,
                 quick_gelu: bool | None = None, img_size: int | tuple[int, int] | None = None,
                 pool: str | None = None, drop_path: float = 0.0, frozen: bool = True, modality: str = "video",
                 **kwargs: Any) -> None:
        visual = self._build_visual(name, pretrained, quick_gelu, img_size, kwargs)
        _check_supported(visual, name)
        avg = visual.pool_type == "avg"
        super().__init__(modality, pool or ("avg" if avg else "cls"))
        self.name = name
        self.frame_select = frame_select_of(frame_select)
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

        what = f"clip_vit {name!r}"
        kind = _source_kind(name, pretrained, what)
        pretrained = str(pretrained) if pretrained else None
        quick_gelu = resolve_quick_gelu(name, pretrained, kind == "hub tag", quick_gelu, what)
        create: dict[str, Any] = dict(kwargs)
        if quick_gelu is True:
            create["force_quick_gelu"] = True
        elif quick_gelu is False:
            create["quick_gelu"] = False  # model override (open_clip has no "force GELU" flag)
        if img_size is not None:
            create["force_image_size"] = img_size
            if "vision_cfg" in create:  # a vision_cfg override replaces the config force_image_size edits
                create["vision_cfg"] = {**create["vision_cfg"], "image_size": img_size}
        by_open_clip = pretrained if kind in ("file", "hub tag") else None  # a folder is read by fusionkit
        try:
            with contextlib.nullcontext() if by_open_clip else quiet():
                # random init is what pretrained=None asks for: drop open_clip's warning about it
                model = open_clip.create_model(name, pretrained=by_open_clip, **create)
        except Exception as err:
            if by_open_clip:
                raise PretrainedError(f"{what}: cannot load pretrained {kind} {pretrained!r}: {err}") from err
            raise
        if kind == "folder":
            _load_folder(model, str(pretrained), what)
        return model.visual

    @property
    def ln_post(self) -> nn.Module:
        """CLIP's final LayerNorm (registered as ``pool_norm``, or ``final_norm`` for avg pooling)."""
        return self.final_norm if isinstance(self.pool_norm, nn.Identity) else self.pool_norm

    def no_weight_decay(self) -> set[str]:
        """Parameters without weight decay, as open_clip's ``VisionTransformer`` declares them."""
        return {"positional_embedding", "class_embedding"}

    @property
    def layers(self) -> nn.ModuleList:  # type: ignore[override]
        return self.blocks

    def embed(self, inputs: Tensor) -> Tokens:
        """Video ``(B, 3, T, H, W)`` (frames selected) or image ``(B, 3, H, W)`` to tokens."""
        if inputs.dim() not in (4, 5):
            raise ValueError(f"clip_vit expects video (B, 3, T, H, W) or image (B, 3, H, W), "
                             f"got shape {tuple(inputs.shape)}")
        video = self.frame_select(inputs) if inputs.dim() == 5 else inputs[:, :, None]
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



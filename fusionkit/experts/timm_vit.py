"""``timm_vit``: any timm Vision Transformer, applied to each frame of a clip.

Inputs of another size than the model's (e.g. a 102 × 128 spectrogram image, LAVISH) need the
position embedding resampled to the new patch grid; ``pos_resample`` says how (:data:`POS_RESAMPLE`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from fusionkit.attention import Attention, TokenLayout
from fusionkit.experts.base import Expert, FrameSelect, Tokens
from fusionkit.experts.block import Block
from fusionkit.experts.pretrained import PretrainedError, is_local_file, require_online
from fusionkit.registry import EXPERTS

# how the position embedding follows an input of another size than the model's:
#   None      fixed input size (timm's strict patch embedding)
#   bicubic   over the 2-D patch grid (timm's ``resample_abs_pos_embed``, its ``dynamic_img_size``)
#   sequence  linearly over the flattened token sequence, CLS included: the official LAVISH code
#             (``AVE/nets/my_vit.py``, ``forward_patch``), e.g. 197 -> 1 + 6·8 positions
POS_RESAMPLE = (None, "bicubic", "sequence")


def frame_select_of(spec: FrameSelect | dict[str, Any] | None) -> FrameSelect:
    """A :class:`FrameSelect` from a recipe mapping (``{stride: 2, offset: 1}``) or ``None`` (every frame)."""
    if spec is None:
        return FrameSelect()
    return spec if isinstance(spec, FrameSelect) else FrameSelect(**dict(spec))


def create_timm_model(name: str, pretrained: str | bool | None, what: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with fusionkit's ``pretrained`` rules: ``None`` (random init), a local file
    in timm's layout (any format timm reads: .safetensors, .pth, .npz), or ``True`` / a tag to download
    on an online machine (offline: an immediate :class:`PretrainedError` naming the alternative)."""
    import timm

    if isinstance(pretrained, str) and is_local_file(pretrained):
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=pretrained))
    elif pretrained:
        require_online(name if pretrained is True else str(pretrained), f"{what} {name!r}")
        kwargs.update(pretrained=True)
        if isinstance(pretrained, str):
            name = f"{name.split('.')[0]}.{pretrained}"
    try:
        return timm.create_model(name, **kwargs)
    except Exception as err:
        if kwargs.get("pretrained"):
            raise PretrainedError(f"{what} {name!r}: cannot load pretrained={pretrained!r}: {err}") from err
        raise


def sequence_pos_embed(pos_embed: Tensor, length: int) -> Tensor:
    """Position embedding ``(1, N, D)`` linearly interpolated along the token axis to ``(1, length, D)``
    (half-pixel centres, ``align_corners=False``; the identity when ``length == N``)."""
    return F.interpolate(pos_embed.transpose(1, 2), size=length, mode="linear", align_corners=False).transpose(1, 2)


def attention_from_timm(attn: nn.Module) -> Attention:
    """A fusionkit :class:`Attention` holding the weights of a timm ``Attention`` module."""
    extra = [n for n in ("norm", "gate") if not isinstance(getattr(attn, n, None), (nn.Identity, type(None)))]
    if extra:
        raise ValueError(f"timm attention with {', '.join(extra)} is not supported by fusionkit's Attention")
    dim = attn.qkv.in_features
    new = Attention(dim, attn.num_heads, qkv_bias=attn.qkv.bias is not None,
                    qk_norm=not isinstance(attn.q_norm, nn.Identity), attn_drop=attn.attn_drop.p,
                    proj_drop=attn.proj_drop.p)
    new.q_norm, new.k_norm = attn.q_norm, attn.k_norm
    new.load_state_dict(attn.state_dict(), strict=False)
    return new


def block_from_timm(block: nn.Module, window: str) -> Block:
    """Wrap a timm ViT ``Block`` (children reused, attention converted) as a fusionkit :class:`Block`."""
    required = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
    if any(not hasattr(block, n) for n in required):
        raise ValueError(f"timm block {type(block).__name__} is not a pre-norm ViT block (needs {', '.join(required)})")
    new = Block(block.attn.qkv.in_features, attention_from_timm(block.attn), block.mlp, block.norm1, block.norm2,
                window=window, ls1=block.ls1, ls2=block.ls2)
    new.drop_path1, new.drop_path2 = block.drop_path1, block.drop_path2
    return new


@EXPERTS.register("timm_vit")
class TimmViT(Expert):
    """Any timm ViT by name, applied per frame (frame stride/offset align it with tubelets).

    Args:
        name: timm model name (``vit_base_patch16_224``, ``vit_small_patch16_224.augreg_in21k``, ...).
        pretrained: ``None`` (random init), a local weight file in timm's layout, or ``True`` /
            a hub tag to download (online machines only).
        frame_select: which frames of the clip it sees (:class:`FrameSelect` or ``{stride, offset, num}``).
        pool: ``"cls"`` or ``"avg"``; default follows the timm model's ``global_pool``.
        pos_resample: ``None`` (inputs of the model's size only), ``"bicubic"`` or ``"sequence"``
            (inputs of any size; see :data:`POS_RESAMPLE`).
        drop_path: stochastic depth of the blocks.
        frozen: freeze every parameter (default).
        **kwargs: passed to ``timm.create_model`` (``img_size``, ``depth``, ``embed_dim``, ...).

    Tokens: ``(B, T·(E + H·W), D)`` with per-frame extras (CLS, registers); attention window ``space``.
    """

    def __init__(self, name: str = "vit_base_patch16_224", pretrained: str | bool | None = None,
                 frame_select: FrameSelect | dict[str, Any] | None = None, pool: str | None = None,
                 pos_resample: str | None = None, drop_path: float = 0.0, frozen: bool = True,
                 modality: str = "video", **kwargs: Any) -> None:
        if pos_resample not in POS_RESAMPLE:
            raise ValueError(f"timm_vit: unknown pos_resample {pos_resample!r}; valid: null, bicubic, sequence")
        if pos_resample:
            kwargs["dynamic_img_size"] = True  # any input size; tokens (B, h, w, D) from the patch embedding
        vit = create_timm_model(name, pretrained, "timm_vit", num_classes=0, drop_path_rate=drop_path, **kwargs)
        super().__init__(modality, pool or ("avg" if vit.global_pool == "avg" else "cls"))
        if pos_resample == "sequence" and (vit.no_embed_class or vit.num_prefix_tokens != 1):
            raise ValueError(f"timm_vit {name!r}: pos_resample 'sequence' needs one CLS token inside the "
                             "position embedding (no registers, no no_embed_class)")
        self.pos_resample = pos_resample
        vit.blocks = nn.ModuleList(block_from_timm(b, "space") for b in vit.blocks)
        vit.reset_classifier(0)
        self.vit = vit
        self.frame_select = frame_select_of(frame_select)
        self.dims = [vit.embed_dim] * len(vit.blocks)
        # the norms move out of the timm model so that each parameter has one name
        self.final_norm, vit.norm = vit.norm, nn.Identity()
        self.pool_norm, vit.fc_norm = vit.fc_norm, nn.Identity()
        if frozen:
            self.freeze()

    @property
    def layers(self) -> nn.ModuleList:  # type: ignore[override]
        return self.vit.blocks

    def embed(self, inputs: Tensor) -> Tokens:
        """Video ``(B, 3, T, H, W)`` (frames selected) or image ``(B, 3, H, W)`` to tokens ``(B, T·(E + h·w), D)``;
        with ``pos_resample`` any ``H, W`` (``h, w = H // p, W // p`` for patch size ``p``)."""
        video = self.frame_select(inputs) if inputs.dim() == 5 else inputs[:, :, None]
        b, t = video.shape[0], video.shape[2]
        frames = rearrange(video, "b c t h w -> (b t) c h w")
        if self.pos_resample:  # rows / columns past the last whole patch fall outside the grid (a strided conv)
            ph, pw = self.vit.patch_embed.patch_size
            frames = frames[..., : frames.shape[-2] // ph * ph, : frames.shape[-1] // pw * pw]
        x = self.vit.patch_embed(frames)
        grid = x.shape[1:3] if x.dim() == 4 else self.vit.patch_embed.grid_size
        x = self._sequence_pos_embed(x) if self.pos_resample == "sequence" else self.vit._pos_embed(x)
        x = self.vit.norm_pre(self.vit.patch_drop(x))
        layout = TokenLayout(t, grid[0], grid[1], self.vit.num_prefix_tokens, per_frame_extras=True)
        return Tokens(rearrange(x, "(b t) s d -> b (t s) d", b=b), layout)

    def _sequence_pos_embed(self, patches: Tensor) -> Tensor:
        """Patch tokens ``(B', h, w, D)`` -> ``(B', 1 + h·w, D)``: CLS prepended, then the position
        embedding resampled along the sequence (``pos_resample: sequence``)."""
        x = patches.flatten(1, 2)
        x = torch.cat([self.vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.vit.pos_drop(x + sequence_pos_embed(self.vit.pos_embed, x.shape[1]))

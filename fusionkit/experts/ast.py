"""AST, the Audio Spectrogram Transformer (Gong et al., 2021): a DeiT-style ViT over a log-mel fbank.

The spectrogram ``(B, frames, mel)`` is read as a one-channel image ``(B, 1, mel, frames)`` and cut
into 16×16 patches overlapping by 6 in both axes (stride 10): a grid of ``F`` frequency rows by
``T`` time columns, flattened frequency-major (token ``f·T + t``) as in the official and HF models.
A CLS and a distillation token lead the sequence; the clip feature is their mean after the final
LayerNorm (HF ``ASTModel``'s pooler).

Weights load from three layouts (see :func:`convert_ast_state_dict`): the official
YuanGongND/ast checkpoints (``module.v.*``, timm DeiT names), HF transformers
(``audio_spectrogram_transformer.*``, both the hub names and transformers 5 module names) and
fusionkit's own ``state_dict``.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionkit.attention import Attention, TokenLayout
from fusionkit.experts.base import Expert, Tokens
from fusionkit.experts.block import Block
from fusionkit.experts.pretrained import (
    PretrainedError,
    StateDict,
    hub_download,
    is_local_file,
    load_into,
    read_state_dict,
    require_online,
)
from fusionkit.frontends.fbank import KaldiFbank
from fusionkit.registry import EXPERTS

# --------------------------------------------------------------------------------------------
# state-dict conversion

_OFFICIAL_DROP = re.compile(r"^(mlp_head\.|v\.head\.|v\.head_dist\.)")
_HF_DROP = re.compile(r"^classifier\.")
_HF_GLOBAL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "final_norm.weight",
    "layernorm.bias": "final_norm.bias",
}
# per-layer HF names (hub / transformers 4, then transformers 5 modules) -> fusionkit names
_HF_LAYER = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV = {"attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
           "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v"}
_HF_LAYER_KEY = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")


def ast_layout(sd: StateDict) -> str:
    """Which layout ``sd`` is in: ``"official"``, ``"hf"`` or ``"fusionkit"``."""
    if any(k.startswith(("v.", "module.v.")) for k in sd):
        return "official"
    if any(k.endswith("embeddings.cls_token") for k in sd):
        return "hf"
    return "fusionkit"


def _convert_official(sd: StateDict) -> StateDict:
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("module.")
        if _OFFICIAL_DROP.match(key):
            continue
        key = key.removeprefix("v.")
        out["final_norm." + key[len("norm."):] if key.startswith("norm.") else key] = value
    return out


def _convert_hf(sd: StateDict) -> StateDict:
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in sd.items():
        key = key.removeprefix("audio_spectrogram_transformer.")
        if _HF_DROP.match(key):
            continue
        if key in _HF_GLOBAL:
            out[_HF_GLOBAL[key]] = value
            continue
        m = _HF_LAYER_KEY.match(key)
        if m:
            i, name, kind = int(m.group(1)), m.group(2), m.group(3)
            if name in _HF_QKV:
                qkv.setdefault((i, kind), {})[_HF_QKV[name]] = value
                continue
            if name in _HF_LAYER:
                out[f"blocks.{i}.{_HF_LAYER[name]}.{kind}"] = value
                continue
        out[key] = value  # unknown: kept so that a strict load names it
    for (i, kind), parts in sorted(qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise PretrainedError(f"AST weights: layer {i} has no {kind} for {', '.join(missing)} of the "
                                  "query/key/value projections")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def convert_ast_state_dict(sd: StateDict) -> StateDict:
    """Convert an AST state dict in any supported layout to fusionkit's :class:`AST` names.

    * official (YuanGongND/ast): ``module.v.{cls_token, dist_token, pos_embed, patch_embed.proj.*,
      blocks.N.*, norm.*}`` (``module.`` optional); ``mlp_head.*`` and DeiT's ``v.head*`` dropped;
    * HF transformers (optionally under ``audio_spectrogram_transformer.``): ``embeddings.*``,
      ``encoder.layer.N.attention.attention.{query,key,value}`` / ``layers.N.attention.{q,k,v}_proj``
      (fused into ``qkv``), ``attention.output.dense`` / ``attention.o_proj``,
      ``intermediate.dense`` / ``mlp.fc1``, ``output.dense`` / ``mlp.fc2``, ``layernorm_before`` /
      ``layernorm_after``, final ``layernorm``; ``classifier.*`` dropped;
    * fusionkit: returned as it is.

    Keys that match nothing are passed through unchanged, so a strict load reports them.
    """
    layout = ast_layout(sd)
    if layout == "official":
        return _convert_official(sd)
    if layout == "hf":
        return _convert_hf(sd)
    return dict(sd)


# --------------------------------------------------------------------------------------------
# the expert


class PatchEmbed(nn.Module):
    """Overlapping 2-D patches of a ``(B, 1, mel, frames)`` spectrogram: ``proj`` is the Conv2d."""

    def __init__(self, dim: int, patch_size: int, fstride: int, tstride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=patch_size, stride=(fstride, tstride))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


@EXPERTS.register("ast")
class AST(Expert):
    """AST audio ViT (Audio Spectrogram Transformer) over a 128-bin Kaldi fbank, CLS + distillation tokens.

    Args:
        pretrained: ``None`` (random init), a local weight file (official AST, HF transformers or
            fusionkit layout; see :func:`convert_ast_state_dict`) or a hub repository name such as
            ``"MIT/ast-finetuned-audioset-10-10-0.4593"`` (online machines only).
        embed_dim, depth, num_heads, mlp_ratio: transformer size (defaults: ViT-Base, as AST).
        num_mel_bins: mel bands of the input features (128).
        max_length: frames of the spectrogram the position embeddings are laid out for (AST's
            ``input_tdim``, 1024 = 10.24 s). Inputs of another length get the time axis of the
            patch-position grid resized bilinearly (``F.interpolate``, ``align_corners=False``) to
            their patch grid; CLS and distillation positions are kept as they are.
        patch_size, fstride, tstride: patch side and strides in frequency and time (16, 10, 10).
        qkv_bias: bias on the query/key/value projections.
        norm_eps: LayerNorm epsilon; 1e-12 as in HF transformers (the official timm DeiT code
            uses 1e-6; the difference is far below fp32 noise for trained weights).
        drop_path: stochastic depth, increasing linearly to this value over the blocks.
        pool: ``"extras"`` (mean of CLS and distillation, the default), ``"cls"`` or ``"avg"``.
        frozen: freeze every parameter (default).
        sample_rate: rate of raw waveforms given to :meth:`embed` (resampled to 16 kHz).
        frontend: extra keyword arguments for the :class:`~fusionkit.frontends.KaldiFbank` front-end
            (``mean``, ``std``, ``normalize``, ...).

    Input (``modality`` ``"audio"``): waveforms ``(B, samples)`` / ``(B, channels, samples)`` run
    through ``frontend``; a 3-D tensor whose last dimension is ``num_mel_bins`` is taken as
    precomputed features ``(B, frames, mel)``.
    Tokens: ``(B, 2 + F·T, D)`` with ``TokenLayout(t=1, h=F, w=T, extras=2)``; attention window
    ``global``. The final LayerNorm is ``final_norm``.
    """

    def __init__(self, pretrained: str | None = None, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, num_mel_bins: int = 128, max_length: int = 1024, patch_size: int = 16,
                 fstride: int = 10, tstride: int = 10, qkv_bias: bool = True, norm_eps: float = 1e-12,
                 drop_path: float = 0.0, pool: str = "extras", frozen: bool = True, modality: str = "audio",
                 sample_rate: int = 16000, frontend: dict[str, Any] | None = None) -> None:
        from timm.layers import Mlp

        if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
            raise TypeError(f"ast: pretrained must be None, a file path or a hub name, got {pretrained!r}")
        pretrained = None if pretrained is None else os.fspath(pretrained)
        if pretrained and not is_local_file(pretrained):
            require_online(pretrained, "ast")  # fail before building anything
        if num_mel_bins < patch_size or max_length < patch_size:
            raise ValueError(f"ast: num_mel_bins ({num_mel_bins}) and max_length ({max_length}) must be at least "
                             f"patch_size ({patch_size})")
        super().__init__(modality, pool)
        self.num_mel_bins = num_mel_bins
        self.max_length = max_length
        self.patch_size = patch_size
        self.fstride, self.tstride = fstride, tstride
        self.grid = self.grid_for(max_length)
        self.frontend = KaldiFbank(sample_rate=sample_rate, num_mel_bins=num_mel_bins, target_length=max_length,
                                   **dict(frontend or {}))
        self.patch_embed = PatchEmbed(embed_dim, patch_size, fstride, tstride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 + self.grid[0] * self.grid[1], embed_dim))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, Attention(embed_dim, num_heads, qkv_bias=qkv_bias),
                  Mlp(embed_dim, int(embed_dim * mlp_ratio), act_layer=nn.GELU),
                  nn.LayerNorm(embed_dim, eps=norm_eps), nn.LayerNorm(embed_dim, eps=norm_eps),
                  window="global", drop_path=rates[i])
            for i in range(depth))
        self.final_norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.dims = [embed_dim] * depth
        self._init_weights()
        if pretrained:
            self.load_pretrained(pretrained)
        if frozen:
            self.freeze()

    # the protocol's attributes -----------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """Parameters without weight decay (timm's convention): the CLS / distillation tokens and position embeddings."""
        return {"cls_token", "dist_token", "pos_embed"}

    @property
    def layers(self) -> nn.ModuleList:  # type: ignore[override]
        return self.blocks

    @property
    def dim(self) -> int:
        return self.cls_token.shape[-1]

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def grid_for(self, frames: int) -> tuple[int, int]:
        """Patch grid ``(F, T)`` of a ``(frames, num_mel_bins)`` spectrogram."""
        if frames < self.patch_size:
            raise ValueError(f"ast: {frames} frames are fewer than one patch ({self.patch_size} frames)")
        return ((self.num_mel_bins - self.patch_size) // self.fstride + 1,
                (frames - self.patch_size) // self.tstride + 1)

    # loading -----------------------------------------------------------------------------------

    def load_pretrained(self, pretrained: str) -> None:
        """Load a local file or (online) a hub repository, in any layout :func:`convert_ast_state_dict` reads."""
        if not is_local_file(pretrained):
            path = hub_download(pretrained, "ast")
        else:
            path = pretrained
        load_into(self, convert_ast_state_dict(read_state_dict(path)), source=str(path))

    # forward -----------------------------------------------------------------------------------

    def features(self, inputs: Tensor) -> Tensor:
        """Fbank features ``(B, frames, mel)``: ``inputs`` itself when it already is one, else ``frontend(inputs)``."""
        if inputs.dim() == 3 and inputs.shape[-1] == self.num_mel_bins:
            return inputs
        if inputs.dim() in (2, 3):
            return self.frontend(inputs)
        raise ValueError(f"ast expects a waveform (B, samples) / (B, channels, samples) or fbank features "
                         f"(B, frames, {self.num_mel_bins}), got shape {tuple(inputs.shape)}")

    def position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """Position embeddings ``(1, 2 + F·T, D)`` for a patch grid, resizing the learned grid bilinearly."""
        if grid == self.grid:
            return self.pos_embed
        extras, patches = self.pos_embed[:, :2], self.pos_embed[:, 2:]
        d = patches.shape[-1]
        patches = patches.reshape(1, self.grid[0], self.grid[1], d).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
        return torch.cat([extras, patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d)], dim=1)

    def embed(self, inputs: Tensor) -> Tokens:
        """Waveform or fbank features to ``(B, 2 + F·T, D)`` tokens (CLS, distillation, patches f-major)."""
        feats = self.features(inputs)
        grid = self.grid_for(feats.shape[1])
        x = self.patch_embed(feats.transpose(1, 2).unsqueeze(1).to(self.cls_token.dtype))  # (B, D, F, T)
        x = x.flatten(2).transpose(1, 2)
        b = x.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.dist_token.expand(b, -1, -1), x], dim=1)
        x = x + self.position_embedding(grid)
        return Tokens(x, TokenLayout(1, grid[0], grid[1], extras=2, per_frame_extras=False))

"""``videomae_vit``: the VideoMAE tubelet ViT (joint space-time attention), CAST's temporal expert.

The network (VideoMAE fine-tuning layout): a Conv3d patch embedding over ``tubelet × patch × patch``
tubelets, a fixed 1-D sinusoidal position table over all ``T'·N`` tokens (no CLS), pre-norm blocks
with global attention whose qkv projection has no bias but learned query and value biases (the key
bias is zero), a GELU MLP, LayerNorm eps 1e-6, and either mean pooling followed by ``fc_norm``
(default) or a final ``norm`` on every token.

Weights load from the official VideoMAE pre-training layout (``encoder.*``), the official
fine-tuned layout, Hugging Face ``transformers`` (``videomae.encoder.layer.N.*``, old ``q_bias`` /
new ``query.bias`` naming) or fusionkit's own layout; see :func:`convert_videomae_state_dict`.
fusionkit's layout is the fine-tuned one with ``norm`` → ``final_norm``, ``fc_norm`` → ``pool_norm``
and layer scales ``gamma_1/2`` → ``ls1/ls2.gamma``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from fusionkit.attention import Attention, TokenLayout
from fusionkit.experts.base import Expert, Tokens, build_frontend
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
from fusionkit.registry import EXPERTS

log = logging.getLogger(__name__)

#: ``size`` presets: embed dim, depth, heads (mlp ratio 4 for all).
SIZES: dict[str, tuple[int, int, int]] = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16)}


# Parts of a checkpoint that are not the encoder (classifier heads, the MAE decoder, its mask token).
_DROPPED = ("head.", "classifier.", "decoder.", "encoder_to_decoder.", "mask_token")

# Official VideoMAE (fine-tuned, or pre-training with ``encoder.`` stripped) -> fusionkit.
_OFFICIAL_RULES = (
    (r"^norm\.", "final_norm."),
    (r"^fc_norm\.", "pool_norm."),
    (r"^(blocks\.\d+)\.gamma_([12])$", r"\1.ls\2.gamma"),
)

# Hugging Face transformers (``videomae.`` stripped) -> fusionkit; q/k/v weights are fused apart.
_LAYER = r"^encoder\.layer\.(\d+)\."
_HF_RULES = (
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (_LAYER + r"attention\.attention\.(?:q_bias|query\.bias)$", r"blocks.\1.attn.q_bias"),
    (_LAYER + r"attention\.attention\.(?:v_bias|value\.bias)$", r"blocks.\1.attn.v_bias"),
    (_LAYER + r"attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (_LAYER + r"intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (_LAYER + r"output\.dense\.", r"blocks.\1.mlp.fc2."),
    (_LAYER + r"layernorm_before\.", r"blocks.\1.norm1."),
    (_LAYER + r"layernorm_after\.", r"blocks.\1.norm2."),
    (r"^layernorm\.", "final_norm."),
    (r"^fc_norm\.", "pool_norm."),
)
_HF_QKV = re.compile(_LAYER + r"attention\.attention\.(query|key|value)\.weight$")


def sinusoid_table(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """VideoMAE's fixed position table ``(length, dim)``: angle ``p / 10000^(2⌊j/2⌋/dim)``, sine on
    even and cosine on odd dims (computed in float64, returned in float32)."""
    pos = torch.arange(length, dtype=torch.float64, device=device)[:, None]
    j = torch.arange(dim, device=device)
    angles = pos / torch.pow(10000.0, (2 * (j // 2)).double() / dim)
    return torch.where(j % 2 == 0, angles.sin(), angles.cos()).float()


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    """``key`` rewritten by the first rule whose pattern matches it (unchanged when none does)."""
    for pattern, repl in rules:
        new, hits = re.subn(pattern, repl, key)
        if hits:
            return new
    return key


def detect_videomae_layout(sd: StateDict) -> str:
    """``"hf"`` (transformers), ``"pretrain"`` (official MAE ``encoder.*``) or ``"vit"`` (official
    fine-tuned or fusionkit); ``PretrainedError`` naming some keys when none fits."""
    keys = [k.removeprefix("videomae.") for k in sd]
    if any(k.startswith(("embeddings.patch_embeddings.", "encoder.layer.")) for k in keys):
        return "hf"
    if any(k.startswith(("encoder.patch_embed.", "encoder.blocks.")) for k in keys):
        return "pretrain"
    if any(k.startswith(("patch_embed.", "blocks.")) for k in keys):
        return "vit"
    raise PretrainedError(f"not a VideoMAE state dict (no patch embedding or block keys); first keys: "
                          f"{', '.join(list(sd)[:6])}")


def _from_hf(sd: StateDict) -> StateDict:
    """Hugging Face layout to fusionkit: separate q/k/v weights fused into ``qkv.weight``."""
    out: StateDict = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        match = _HF_QKV.match(key)
        if match:
            qkv.setdefault(match.group(1), {})[match.group(2)] = value
        else:
            out[_rename(key, _HF_RULES)] = value
    for layer, parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{layer}.attn.qkv.weight"] = torch.cat([parts["query"], parts["key"], parts["value"]])
        else:  # left under their own names so that the load error lists them
            out.update({f"encoder.layer.{layer}.attention.attention.{p}.weight": w for p, w in parts.items()})
    return out


def convert_videomae_state_dict(sd: StateDict) -> StateDict:
    """Any VideoMAE encoder state dict (layout detected) to fusionkit's layout.

    Classifier heads, the MAE decoder and its mask token are dropped; keys the converter does not
    know keep their names so that a strict load reports them. Both ``final_norm.*`` (from
    ``norm`` / ``layernorm``) and ``pool_norm.*`` (from ``fc_norm``) are returned when present: the
    expert keeps the one its pooling uses.
    """
    layout = detect_videomae_layout(sd)
    if layout == "hf":
        sd = {k.removeprefix("videomae."): v for k, v in sd.items()}
    elif layout == "pretrain":
        sd = {k.removeprefix("encoder."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(_DROPPED)}
    if layout == "hf":
        return _from_hf(sd)
    return {_rename(k, _OFFICIAL_RULES): v for k, v in sd.items()}


class TubeletEmbed(nn.Module):
    """Conv3d over non-overlapping ``tubelet × patch × patch`` tubelets: ``(B, C, T, H, W)`` to
    ``(B, D, T/tubelet, H/patch, W/patch)``."""

    def __init__(self, dim: int, patch_size: int, tubelet_size: int, in_chans: int = 3) -> None:
        super().__init__()
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=kernel, stride=kernel)

    def forward(self, video: Tensor) -> Tensor:
        return self.proj(video)


@EXPERTS.register("videomae_vit")
class VideoMAEViT(Expert):
    """VideoMAE tubelet ViT (joint space-time attention, q/v biases), CAST's temporal expert.

    Args:
        size: preset ``"S"`` (384, 12 layers, 6 heads), ``"B"`` (768, 12, 12) or ``"L"`` (1024, 24, 16).
        pretrained: ``None`` (random init), a local weight file in any layout that
            :func:`convert_videomae_state_dict` reads, or a hub id (``MCG-NJU/videomae-base``; online
            machines only). A pre-training checkpoint has no ``fc_norm``: with mean pooling it stays
            at its init (ones, zeros) and the checkpoint's ``norm`` is dropped.
        use_mean_pooling: ``True``: no final norm, clip feature ``fc_norm(mean of tokens)``;
            ``False``: ``norm`` on every final token, mean without norm.
        embed_dim, depth, num_heads, mlp_ratio: override the preset.
        img_size, num_frames: the clip the position table is built for (other sizes divisible by
            the patch and tubelet still run, with the table computed for their token count).
        tubelet_size, patch_size: tubelet extent in frames and pixels.
        init_values: layer-scale init (``None``: no layer scale).
        drop_path: stochastic depth at the last block (linear from 0 over the blocks).
        frozen: freeze every parameter (default).
        pool: clip feature of the heads: ``avg`` (VideoMAE's mean pooling, default) or ``max``.
        frontend: ``{type: <registered frontend>, ...}`` applied to the video first (e.g. ``resize``
            for a low-resolution motion stream; then ``img_size`` is the resized side), or ``None``.

    Tokens: ``(B, T'·N, D)`` time-major (``b (t n) d``), ``T' = T / tubelet``, no extras; window
    ``global``.
    """

    def __init__(self, size: str = "B", pretrained: str | None = None, use_mean_pooling: bool = True,
                 embed_dim: int | None = None, depth: int | None = None, num_heads: int | None = None,
                 mlp_ratio: float = 4.0, img_size: int = 224, num_frames: int = 16, tubelet_size: int = 2,
                 patch_size: int = 16, init_values: float | None = None, drop_path: float = 0.0,
                 frozen: bool = True, modality: str = "video", pool: str = "avg",
                 frontend: Mapping[str, Any] | nn.Module | None = None) -> None:
        if size not in SIZES:
            raise ValueError(f"unknown VideoMAE size {size!r}; valid: {', '.join(SIZES)}")
        if pretrained is not None and not is_local_file(pretrained):
            require_online(pretrained, "videomae_vit")
        super().__init__(modality, pool)
        dim, depth, num_heads = (given or preset for given, preset in zip((embed_dim, depth, num_heads), SIZES[size]))
        if img_size % patch_size or num_frames % tubelet_size:
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size} and num_frames "
                             f"{num_frames} by tubelet_size {tubelet_size}")
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        self.img_size, self.num_frames = img_size, num_frames
        self.frontend = build_frontend(frontend)
        self.patch_embed = TubeletEmbed(dim, patch_size, tubelet_size)
        num_tokens = (num_frames // tubelet_size) * (img_size // patch_size) ** 2
        self.register_buffer("pos_table", sinusoid_table(num_tokens, dim), persistent=False)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(self._block(dim, num_heads, mlp_ratio, init_values, rate) for rate in rates)
        self.dims = [dim] * depth
        if use_mean_pooling:
            self.pool_norm = nn.LayerNorm(dim, eps=1e-6)
        else:
            self.final_norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(_init_weights)
        if pretrained is not None:
            self.load_pretrained(pretrained)
        if frozen:
            self.freeze()

    @staticmethod
    def _block(dim: int, num_heads: int, mlp_ratio: float, init_values: float | None, drop_path: float) -> Block:
        from timm.layers import LayerScale, Mlp

        return Block(dim, Attention(dim, num_heads, qkv_bias="qv"), Mlp(dim, int(dim * mlp_ratio)),
                     nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6), window="global",
                     ls1=LayerScale(dim, init_values) if init_values else None,
                     ls2=LayerScale(dim, init_values) if init_values else None, drop_path=drop_path)

    @property
    def layers(self) -> nn.ModuleList:  # type: ignore[override]
        return self.blocks

    def embed(self, inputs: Tensor) -> Tokens:
        """Video ``(B, 3, T, H, W)`` (after ``frontend``) to tokens ``(B, T/tubelet · H/patch · W/patch, D)``
        plus positions."""
        inputs = self.frontend(inputs)
        in_chans = self.patch_embed.proj.in_channels
        if (inputs.dim() != 5 or inputs.shape[1] != in_chans or inputs.shape[2] % self.tubelet_size
                or inputs.shape[3] % self.patch_size or inputs.shape[4] % self.patch_size):
            raise ValueError(
                f"videomae_vit expects video (B, {in_chans}, T, H, W) with T divisible by the tubelet "
                f"{self.tubelet_size} and H, W by the patch {self.patch_size} (built for "
                f"(B, {in_chans}, {self.num_frames}, {self.img_size}, {self.img_size})); got {tuple(inputs.shape)}")
        x = self.patch_embed(inputs)
        layout = TokenLayout(x.shape[2], x.shape[3], x.shape[4])
        x = rearrange(x, "b d t h w -> b (t h w) d")
        n = x.shape[1]
        table = self.pos_table[:n] if n <= self.pos_table.shape[0] else sinusoid_table(n, x.shape[2], x.device)
        return Tokens(x + table.to(x.dtype), layout)

    def load_pretrained(self, spec: str) -> None:
        """Load weights from a local file or a hub id (see the class docstring)."""
        path = spec if is_local_file(spec) else hub_download(spec, "videomae_vit")
        sd = convert_videomae_state_dict(read_state_dict(path))
        own = self.state_dict()
        if "pool_norm.weight" in own and "pool_norm.weight" not in sd:
            log.info("videomae_vit: %s has no fc_norm; keeping its initial values", spec)
            sd.update({k: v for k, v in own.items() if k.startswith("pool_norm.")})
        load_into(self, sd, repr(spec), ignore=lambda k: k not in own and k.startswith(("final_norm.", "pool_norm.")))

    def extra_repr(self) -> str:
        return f"tubelet={self.tubelet_size}, patch={self.patch_size}, built_for=({self.num_frames}, {self.img_size})"


def _init_weights(module: nn.Module) -> None:
    """VideoMAE's init: Linear weights truncated normal (std 0.02), biases zero; LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

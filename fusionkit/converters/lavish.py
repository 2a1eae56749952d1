"""``lavish-official``: official LAVISH checkpoints (GenjiB/LAVISH) <-> fusionkit recipe ``lavish_vitb16``.

Reads the whole-model state dict of the official AVE model (``AVE/nets/net_trans.py``, ``MMIL_Net``
with ``vis_encoder_type=vit``, as its training script ``AVE/main_trans.py`` saves it with
``torch.save(model.state_dict(), ...)``) with any number of blocks and any width:

* ``ViT.v.*``: the frozen timm ViT (``my_vit`` keeps it as ``.v``; its patch embedding is a plain
  ``proj`` convolution);
* ``{vis,audio}_adapter_blocks_p{1,2}.N.*``: the four ``VisualAdapter`` of block ``N``; ``vis_*``
  adapt the video stream from the audio one, ``audio_*`` the reverse; ``p1`` sits beside the
  attention, ``p2`` beside the MLP (``forward_vit``);
* ``mlp_class.*``, ``mlp_class_2.*``: the head on ``concat(audio CLS, video CLS)``.

The adapters' 1×1 ``Conv2d`` weights ``(C_out, C_in / groups, 1, 1)`` become fusionkit's ``Conv1d``
weights ``(C_out, C_in / groups, 1)`` and back; every other tensor is renamed as it is. The frozen
ViT's own ImageNet classifier (``ViT.v.head.*``), which ``forward_vit`` never calls, has no place in
fusionkit: drop it with ``--ignore 'ViT.v.head.*'``. See docs/convert.md for the key table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from torch import Tensor

from fusionkit.converters.base import ConvertError, Converter, StateDict, check_keys, leaf_pairs, unwrap

RECIPE = "lavish_vitb16"
VIDEO, FUSION, HEAD = "video", "lavish", "event"   # names used by recipes/lavish_vitb16.yaml
_V, _F = f"experts.{VIDEO}", f"fusions.{FUSION}"
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# one-to-one renames outside the blocks: (official, fusionkit)
_GLOBAL: list[tuple[str, str]] = [
    ("ViT.v.cls_token", f"{_V}.vit.cls_token"),
    ("ViT.v.pos_embed", f"{_V}.vit.pos_embed"),
    *leaf_pairs("ViT.v.patch_embed.proj", f"{_V}.vit.patch_embed.proj"),
    *leaf_pairs("ViT.v.norm", f"{_V}.final_norm"),
    *leaf_pairs("mlp_class", f"heads.{HEAD}.fc1"),
    *leaf_pairs("mlp_class_2", f"heads.{HEAD}.fc2"),
]

# official adapter list -> fusionkit adapter of the LAVISH operator at the same block
_ADAPTERS = {
    "vis_adapter_blocks_p1": "attn_adapters.audio_to_video",
    "audio_adapter_blocks_p1": "attn_adapters.video_to_audio",
    "vis_adapter_blocks_p2": "mlp_adapters.audio_to_video",
    "audio_adapter_blocks_p2": "mlp_adapters.video_to_audio",
}

# inside one adapter: renames, then the 1x1 convolutions (4-D officially, 3-D in fusionkit)
_ADAPTER_LEAVES: list[tuple[str, str]] = [
    ("my_tokens", "latents"), ("gate_tk", "latent_gate"), ("gate_av", "fusion_gate"), ("gate", "gate"),
    *leaf_pairs("ln_before", "norm_before"), *leaf_pairs("bn1", "down_norm", _BN),
    *leaf_pairs("bn2", "up_norm", _BN), *leaf_pairs("ln_post", "norm_after"),
]
_ADAPTER_CONVS = [("down_sampler.weight", "down.weight"), ("up_sampler.weight", "up.weight")]

_VIT_BLOCK = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")

_OFFICIAL_BLOCK = re.compile(r"^(?:ViT\.v\.blocks|(?:vis|audio)_adapter_blocks_p[12])\.(\d+)\.")
_FUSIONKIT_BLOCK = re.compile(rf"^(?:{re.escape(_V)}\.vit\.blocks|{re.escape(_F)})\.(\d+)\.")


def _num_blocks(keys: Iterable[str], pattern: re.Pattern[str], what: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if not found:
        example = "ViT.v.blocks.0.norm1.weight" if pattern is _OFFICIAL_BLOCK else f"{_V}.vit.blocks.0.norm1.weight"
        raise ConvertError(f"{what}: no per-block keys found (expected keys like {example})")
    return max(found) + 1   # a gap shows up as missing keys of that block


def adapter_rules(i: int, step: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(renames, convolutions)`` of the four adapters of official block ``i`` (counted over the whole
    backbone), which sit at graph step ``step`` of the LAVISH operator: ``(official, fusionkit)`` pairs."""
    renames, convs = [], []
    for official, adapter in _ADAPTERS.items():
        o, f = f"{official}.{i}", f"{_F}.{step}.{adapter}"
        renames += [(f"{o}.{a}", f"{f}.{b}") for a, b in _ADAPTER_LEAVES]
        convs += [(f"{o}.{a}", f"{f}.{b}") for a, b in _ADAPTER_CONVS]
    return renames, convs


def _rules(n: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(renames, convolutions)`` for ``n`` blocks, each a list of ``(official, fusionkit)`` keys."""
    renames, convs = list(_GLOBAL), []
    for i in range(n):
        for module in _VIT_BLOCK:
            renames += leaf_pairs(f"ViT.v.blocks.{i}.{module}", f"{_V}.vit.blocks.{i}.{module}")
        more, conv = adapter_rules(i, i)
        renames, convs = renames + more, convs + conv
    return renames, convs


def reshaped(key: str, value: Tensor, ndim: int, what: str) -> Tensor:
    """A 1×1 convolution weight ``(C_out, C_in / g, 1[, 1])`` with one trailing 1 added or removed."""
    if value.dim() != ndim or value.shape[-1] != 1:
        raise ConvertError(f"{what}: {key} has shape {tuple(value.shape)}; expected a {ndim}-D 1x1 "
                           "convolution weight")
    return value[..., 0] if ndim == 4 else value[..., None]


def apply_rules(sd: Mapping[str, Tensor], rules: tuple[list[tuple[str, str]], list[tuple[str, str]]], what: str,
                hint: str, export: bool = False) -> StateDict:
    """``sd`` renamed by ``(official, fusionkit)`` key pairs (``rules``: renames, 1×1 convolutions;
    read right to left for an ``export``), after one check of every key; the convolutions' weights
    lose (import) or gain (export) their trailing 1."""
    renames, convs = ([(f, o) for o, f in pairs] for pairs in rules) if export else rules
    check_keys(sd, [src for src, _ in renames + convs], what, hint)
    out: StateDict = {dst: sd[src] for src, dst in renames}
    out.update({dst: reshaped(src, sd[src], 3 if export else 4, what) for src, dst in convs})
    return out


def lavish_from_official(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Official LAVISH (AVE, ViT) state dict, any number of blocks -> fusionkit keys."""
    sd = unwrap(state_dict)
    n = _num_blocks(sd, _OFFICIAL_BLOCK, "lavish-official")
    return apply_rules(sd, _rules(n), "lavish-official", f" ({n} blocks, recipe {RECIPE!r})")


def lavish_to_official(state_dict: Mapping[str, Tensor]) -> StateDict:
    """fusionkit LAVISH state dict (recipe ``lavish_vitb16``, ``latent_gate: true``) -> the official layout."""
    sd = unwrap(state_dict)
    n = _num_blocks(sd, _FUSIONKIT_BLOCK, "lavish-official export")
    return apply_rules(sd, _rules(n), "lavish-official export", f" ({n} blocks, recipe {RECIPE!r})", export=True)


def _describe(state_dict: Mapping[str, Tensor]) -> str:
    official = "ViT.v.cls_token" in state_dict
    key = "ViT.v.cls_token" if official else f"{_V}.vit.cls_token"
    n = _num_blocks(state_dict, _OFFICIAL_BLOCK if official else _FUSIONKIT_BLOCK, "lavish-official")
    width = state_dict[key].shape[-1] if key in state_dict else "?"
    return f"LAVISH (ViT, AVE), {n} blocks of width {width}, 4 adapters each; fusionkit recipe {RECIPE!r}"


LAVISH_CONVERTER = Converter(
    "lavish-official",
    "LAVISH (GenjiB/LAVISH AVE MMIL_Net, shared ViT + 4 latent adapters per block) <-> recipe lavish_vitb16",
    lavish_from_official, lavish_to_official, _describe)

__all__ = ["LAVISH_CONVERTER", "adapter_rules", "apply_rules", "lavish_from_official", "lavish_to_official",
           "reshaped"]

"""``lavish-swin-official``: official LAVISH Swin checkpoints (GenjiB/LAVISH) <-> recipe ``lavish_swinv2_l``.

Reads the whole-model state dict of the official AVE model (``AVE/nets/net_trans.py``, ``MMIL_Net``
with ``vis_encoder_type=swin``, saved by ``AVE/main_trans.py``) for any stage depths and widths:

* ``swin.*``: the frozen timm Swin-V2 of the timm release the official code ran (0.6), whose stages
  end with their patch merging (``swin.layers.S.downsample``, S < last); fusionkit's timm starts
  stages 2-4 with it instead, so official ``layers.S.downsample`` is the fusionkit layer that follows
  stage S's blocks. Block parameters keep their names (``norm1``, ``attn.qkv``, ``attn.q_bias``,
  ``attn.v_bias``, ``attn.logit_scale``, ``attn.cpb_mlp.*``, ``attn.proj``, ``norm2``, ``mlp.*``).
* The buffers that timm 0.6 saves but computes from the configuration (``attn.relative_coords_table``,
  ``attn.relative_position_index``, a block's ``attn_mask``) are dropped on import; an export
  leaves them out (load it with ``strict=False`` into the official model, which recomputes them).
* ``{vis,audio}_adapter_blocks_p{1,2}.N.*``: the four adapters of block ``N``, counted over all
  stages (``forward_swin``), renamed as in ``lavish-official`` (:func:`.lavish.adapter_rules`); they
  sit at the operator's step of that block's fusionkit layer (the mergings have none).
* ``mlp_class.*``, ``mlp_class_2.*``: the head on ``concat(video mean, audio mean)`` (the ViT model
  concatenates audio first; the Swin one video first, as the recipe's head does).

Two parameter groups the official forward never uses have no place in fusionkit: the ImageNet
classifier ``swin.head.*`` and ``adapter_token_downsampler.*``; drop them with ``--ignore``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from torch import Tensor

from fusionkit.converters.base import ConvertError, Converter, StateDict, leaf_pairs, unwrap
from fusionkit.converters.lavish import adapter_rules, apply_rules

RECIPE = "lavish_swinv2_l"
_V, HEAD = "experts.video", "heads.event"   # names used by recipes/lavish_swinv2_l.yaml
_BLOCK = ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2", "attn.cpb_mlp.0")
_BLOCK_LEAVES = ("attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.logit_scale", "attn.cpb_mlp.2.weight")
_DERIVED = re.compile(r"^swin\.layers\.\d+\.blocks\.\d+\.(?:attn\.relative_coords_table|attn\.relative_position_index|"
                      r"attn_mask)$")
_OFFICIAL_BLOCK = re.compile(r"^swin\.layers\.(\d+)\.blocks\.(\d+)\.")
_FUSIONKIT_LAYER = re.compile(rf"^{re.escape(_V)}\.layers\.(\d+)\.(block|body)\.")

_GLOBAL: list[tuple[str, str]] = [
    *leaf_pairs("swin.patch_embed.proj", f"{_V}.patch_embed.proj"),
    *leaf_pairs("swin.patch_embed.norm", f"{_V}.patch_embed.norm"),
    *leaf_pairs("swin.norm", f"{_V}.final_norm"),
    *leaf_pairs("mlp_class", f"{HEAD}.fc1"),
    *leaf_pairs("mlp_class_2", f"{HEAD}.fc2"),
]


def _official_depths(keys: Iterable[str]) -> list[int]:
    """Blocks per stage from ``swin.layers.S.blocks.B.*`` keys."""
    depth: dict[int, int] = {}
    for k in keys:
        if m := _OFFICIAL_BLOCK.match(k):
            depth[int(m.group(1))] = max(depth.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    if not depth:
        raise ConvertError("lavish-swin-official: no Swin block keys found (expected keys like "
                           "swin.layers.0.blocks.0.norm1.weight)")
    return [depth.get(s, 0) for s in range(max(depth) + 1)]


def _fusionkit_depths(keys: Iterable[str]) -> list[int]:
    """Blocks per stage from the expert's flat layer list (blocks, with a patch merging between stages)."""
    kinds = {int(m.group(1)): m.group(2) for k in keys if (m := _FUSIONKIT_LAYER.match(k))}
    if not kinds:
        raise ConvertError(f"lavish-swin-official export: no Swin layer keys found (expected keys like "
                           f"{_V}.layers.0.block.norm1.weight)")
    depths = [0]
    for i in range(max(kinds) + 1):
        if kinds.get(i) == "body":
            depths.append(0)
        else:
            depths[-1] += 1
    return depths


def _rules(depths: list[int]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(renames, convolutions)`` for Swin stages of ``depths`` blocks: ``(official, fusionkit)`` pairs."""
    renames, convs, block, layer = list(_GLOBAL), [], 0, 0
    for s, depth in enumerate(depths):
        for b in range(depth):
            o, f = f"swin.layers.{s}.blocks.{b}", f"{_V}.layers.{layer}.block"
            renames += [pair for m in _BLOCK for pair in leaf_pairs(f"{o}.{m}", f"{f}.{m}")]
            renames += [(f"{o}.{leaf}", f"{f}.{leaf}") for leaf in _BLOCK_LEAVES]
            more, conv = adapter_rules(block, layer)  # the operator's steps are the expert's layers
            renames, convs, block, layer = renames + more, convs + conv, block + 1, layer + 1
        if s < len(depths) - 1:
            o, f = f"swin.layers.{s}.downsample", f"{_V}.layers.{layer}.body"
            renames += [(f"{o}.reduction.weight", f"{f}.reduction.weight"), *leaf_pairs(f"{o}.norm", f"{f}.norm")]
            layer += 1
    return renames, convs


def swin_from_official(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Official LAVISH (AVE, Swin) state dict, any stage depths -> fusionkit keys."""
    sd = {k: v for k, v in unwrap(state_dict).items() if not _DERIVED.match(k)}
    depths = _official_depths(sd)
    return apply_rules(sd, _rules(depths), "lavish-swin-official", f" (depths {depths}, recipe {RECIPE!r})")


def swin_to_official(state_dict: Mapping[str, Tensor]) -> StateDict:
    """fusionkit LAVISH Swin state dict (recipe ``lavish_swinv2_l``) -> the official layout (no derived buffers)."""
    sd = unwrap(state_dict)
    depths = _fusionkit_depths(sd)
    return apply_rules(sd, _rules(depths), "lavish-swin-official export", f" (depths {depths}, recipe {RECIPE!r})",
                       export=True)


def _describe(state_dict: Mapping[str, Tensor]) -> str:
    official = any(_OFFICIAL_BLOCK.match(k) for k in state_dict)
    depths = (_official_depths if official else _fusionkit_depths)(state_dict)
    key = "swin.patch_embed.proj.weight" if official else f"{_V}.patch_embed.proj.weight"
    width = state_dict[key].shape[0] if key in state_dict else "?"
    return (f"LAVISH (Swin-V2, AVE), stages of {depths} blocks from width {width}, 4 adapters per block; "
            f"fusionkit recipe {RECIPE!r}")


LAVISH_SWIN_CONVERTER = Converter(
    "lavish-swin-official",
    "LAVISH (GenjiB/LAVISH AVE MMIL_Net, shared Swin-V2 + 4 latent adapters per block) <-> recipe lavish_swinv2_l",
    swin_from_official, swin_to_official, _describe)

__all__ = ["LAVISH_SWIN_CONVERTER", "swin_from_official", "swin_to_official"]

"""AdamW parameter groups: layer-wise lr decay by graph step, weight-decay exclusions, head lr scale.

Layer id of a trainable parameter (``L`` = number of graph steps):

* ``0``: everything of an expert outside its layers (patch / position embeddings, CLS tokens);
* ``s + 1``: a parameter inside the expert layer that runs at graph step ``s`` (the expert's
  ``align`` map; adapters live inside the layer), or inside ``fusions.<op>.<s>``;
* ``L + 1``: the experts' final / pool norms and the heads (and anything else).

Its lr is ``peak_lr · layer_decay ** (L + 1 − id)`` (BEiT / VideoMAE convention: the last layer
gets ``layer_decay``, the heads the full lr), times ``head_lr_scale`` for heads. Weight decay is 0
for 1-D tensors (norms, biases, layer scales), for the parameters that their modules declare in
``no_weight_decay()`` (timm's convention: a set of names relative to the module; position
embeddings, CLS tokens), and for names matching the recipe's ``train.no_weight_decay`` patterns.
Parameters with equal (lr scale, weight decay) share one group.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence, Set
from typing import Any

import torch
from torch import nn


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Layer id of every parameter name of a :class:`~fusionkit.graph.FusionModel`, and ``L + 1``."""
    num_steps = int(getattr(model, "num_steps", 0))
    last = num_steps + 1
    ids: dict[str, int] = {}
    by_param: dict[int, int] = {}
    experts = getattr(model, "experts", {})
    align = getattr(model, "align", {})
    for e, expert in experts.items():
        steps = align.get(e, list(range(len(expert.layers))))
        for i, layer in enumerate(expert.layers):
            for p in layer.parameters():
                by_param.setdefault(id(p), steps[i] + 1)
    for name, p in model.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        if parts[0] == "fusions" and len(parts) > 2 and parts[2].isdigit():
            ids[name] = int(parts[2]) + 1
        elif parts[0] == "experts":
            if id(p) in by_param:
                ids[name] = by_param[id(p)]
            elif len(parts) > 2 and parts[2] in ("final_norm", "pool_norm"):
                ids[name] = last
            else:
                ids[name] = 0
        else:
            ids[name] = last
    return ids, last


def declared_no_weight_decay(model: nn.Module) -> set[str]:
    """Names (as ``model.named_parameters()`` gives them) of the parameters that a module of ``model``
    declares in ``no_weight_decay()``: timm's convention, names relative to the declaring module (a
    declared name the module does not hold, such as timm's ``dist_token`` of a ViT without one, is ignored)."""
    declared: set[int] = set()
    for module in model.modules():
        hook = getattr(module, "no_weight_decay", None)
        if callable(hook):
            own = dict(module.named_parameters())
            declared.update(id(own[name]) for name in hook() if name in own)
    return {name for name, p in model.named_parameters() if id(p) in declared}


def no_decay(name: str, param: torch.Tensor, declared: Set[str], patterns: Sequence[str]) -> bool:
    """True for tensors without weight decay: 1-D (norms, biases), ``declared`` names
    (:func:`declared_no_weight_decay`) and names matching ``patterns``."""
    return param.ndim <= 1 or name in declared or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0,
                 no_weight_decay: Sequence[str] = (), head_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer groups of the trainable parameters (see the module docstring).

    Each group has ``params``, ``names``, ``lr`` (``lr · lr_scale``), ``lr_scale``, ``weight_decay``
    and ``layer_id``; groups are ordered by (layer id, decay), so the order is stable.
    """
    ids, last = layer_ids(model)
    declared = declared_no_weight_decay(model)
    groups: dict[tuple[int, bool, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = ids[name]
        is_head = name.startswith("heads.")
        decay = not no_decay(name, p, declared, no_weight_decay)
        key = (layer, is_head, decay)
        if key not in groups:
            scale = float(layer_decay) ** (last - layer) * (head_lr_scale if is_head else 1.0)
            groups[key] = {"params": [], "names": [], "lr_scale": scale, "lr": lr * scale,
                           "weight_decay": float(weight_decay) if decay else 0.0, "layer_id": layer}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def peak_lr(cfg: Mapping[str, Any], world_size: int = 1) -> float:
    """``train.lr`` if set, else ``base_lr · total batch / lr_batch`` (total = batch · accum · world)."""
    if cfg.get("lr") is not None:
        return float(cfg["lr"])
    total = int(cfg["batch_size"]) * int(cfg["accum_steps"]) * int(world_size)
    return float(cfg["base_lr"]) * total / float(cfg["lr_batch"])


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any], world_size: int = 1) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with the ``train`` section's settings."""
    groups = param_groups(model, peak_lr(cfg, world_size), cfg["weight_decay"], cfg["layer_decay"],
                          cfg["no_weight_decay"], cfg["head_lr_scale"])
    if not groups:
        raise ValueError("no trainable parameter: check the recipe's trainable section")
    return torch.optim.AdamW(groups, lr=peak_lr(cfg, world_size), betas=tuple(cfg["betas"]), eps=float(cfg["eps"]))

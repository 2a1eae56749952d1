"""Test-time ensembles of heads (``eval.ensemble`` of a recipe): the CAST paper's ensemble of experts
(mean class probabilities) and the CA²ST paper's logit ensemble, scored by ``fusionkit eval``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

COMBINE = ("softmax", "logits", "sigmoid")


def ensemble(logits: Mapping[str, Tensor], groups: Mapping[str, Any]) -> dict[str, Tensor]:
    """Test-time ensemble: average the predictions of several heads (``eval.ensemble`` of a recipe).

    Args:
        logits: head name → logits ``(B, C)`` (what ``model(batch)`` returns).
        groups: output name → ``{heads: [head, ...], combine: softmax | logits | sigmoid}`` or just a
            list of heads (``combine: softmax``). ``softmax``: mean of the heads' class probabilities
            (the CAST paper's ensemble of experts); ``logits``: mean of the logits (the CA²ST paper's "logit
            ensemble"); ``sigmoid``: mean of per-class probabilities (multi-label heads).

    Returns:
        output name → ``(B, C)`` scores: the mean probabilities (``softmax`` / ``sigmoid``) or the mean
        logits; top-k and mAP read either. Heads of one group must have the same number of classes.
    """
    out = {}
    for name, spec in groups.items():
        spec = {"heads": list(spec)} if isinstance(spec, Sequence) and not isinstance(spec, str) else dict(spec)
        bad = sorted(set(spec) - {"heads", "combine"})
        if bad:
            raise ValueError(f"ensemble {name!r}: unknown key(s) {bad}; valid: heads, combine")
        heads = list(spec.get("heads") or [])
        combine = spec.get("combine", "softmax")
        if combine not in COMBINE:
            raise ValueError(f"ensemble {name!r}: unknown combine {combine!r}; valid: {', '.join(COMBINE)}")
        if not heads:
            raise ValueError(f"ensemble {name!r}: no heads given")
        missing = [h for h in heads if h not in logits]
        if missing:
            raise KeyError(f"ensemble {name!r}: no logits for head(s) {missing}; heads are {sorted(logits)}")
        shapes = {h: tuple(logits[h].shape) for h in heads}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"ensemble {name!r}: heads disagree on shape {shapes}")
        stack = torch.stack([logits[h] for h in heads])  # (K, B, C)
        if combine == "softmax":
            stack = stack.softmax(dim=-1)
        elif combine == "sigmoid":
            stack = stack.sigmoid()
        out[name] = stack.mean(dim=0)
    return out


__all__ = ["COMBINE", "ensemble"]

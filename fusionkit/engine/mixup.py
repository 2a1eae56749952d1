"""Mixup of video and audio together, with mixed one-hot targets per head.

One ``λ ~ Beta(α, α)`` per batch mixes every modality tensor of the batch with the batch flipped
(timm's ``mixup`` with ``mode="batch"``): ``x ← λ x + (1 − λ) flip(x)``. Targets become
``λ onehot(y) + (1 − λ) onehot(flip(y))`` *unsmoothed*: the heads apply label smoothing themselves
(see :mod:`fusionkit.heads`). The random state is a ``random.Random``, saved in checkpoints as JSON.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor

class Mixup:
    """``mixup(batch, targets) -> (batch, targets, lam)``; ``lam = 1`` when mixup is off for the batch.

    Args:
        alpha: Beta(α, α) parameter (0: off).
        prob: probability of mixing a batch.
        num_classes: head → classes (single-label heads get soft targets).
        seed: seed of the random state.
        keys: batch entries mixed (default ``None``: every floating-point tensor of the batch, i.e.
            every modality it carries: video, audio, motion, iframe, residual, ...).
    """

    def __init__(self, alpha: float, num_classes: Mapping[str, int], prob: float = 1.0, seed: int = 0,
                 keys: Sequence[str] | None = None, multilabel: Sequence[str] = ()) -> None:
        self.alpha, self.prob = float(alpha), float(prob)
        self.num_classes = dict(num_classes)
        self.keys = None if keys is None else tuple(keys)
        self.multilabel = set(multilabel)
        self.rng = random.Random(seed)

    @property
    def active(self) -> bool:
        return self.alpha > 0 and self.prob > 0

    def __call__(self, batch: Mapping[str, Any], targets: Mapping[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor], float]:
        batch, targets = dict(batch), dict(targets)
        if not self.active:
            return batch, targets, 1.0
        draw, lam = self.rng.random(), self.rng.betavariate(self.alpha, self.alpha)
        if draw >= self.prob:
            return batch, targets, 1.0
        for key in batch if self.keys is None else self.keys:
            x = batch.get(key)
            if isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 1:
                batch[key] = x * lam + x.flip(0) * (1.0 - lam)
        for head, y in targets.items():
            if head in self.multilabel or y.dim() == 2:
                soft = y.float()
            else:
                soft = F.one_hot(y.long(), self.num_classes[head]).float()
            targets[head] = soft * lam + soft.flip(0) * (1.0 - lam)
        return batch, targets, lam

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))

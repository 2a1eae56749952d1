"""Learning-rate schedule per optimizer step: linear warm-up, then cosine decay (or constant).

``lr(step) = warmup_lr + (peak − warmup_lr) · step / warmup`` for ``step < warmup``, then
``min_lr + (peak − min_lr) · ½ (1 + cos(π · (step − warmup) / (total − warmup)))``; every group
gets ``lr(step) · group["lr_scale"]`` (layer-wise decay, head scale). The state is one integer.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class WarmupCosine:
    """Sets the lr of every param group before each optimizer step (call :meth:`step` after it)."""

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, total_steps: int, warmup_steps: int = 0,
                 min_lr: float = 0.0, warmup_lr: float = 0.0, kind: str = "cosine") -> None:
        if kind not in ("cosine", "constant"):
            raise ValueError(f"unknown schedule {kind!r}; valid: cosine, constant")
        self.optimizer, self.kind = optimizer, kind
        self.peak, self.min_lr, self.warmup_lr = float(peak_lr), float(min_lr), float(warmup_lr)
        self.total, self.warmup = max(int(total_steps), 1), max(int(warmup_steps), 0)
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """Base lr (before the group's ``lr_scale``) at optimizer step ``step``."""
        if step < self.warmup:
            return self.warmup_lr + (self.peak - self.warmup_lr) * step / self.warmup
        if self.kind == "constant":
            return self.peak
        span = max(self.total - self.warmup, 1)
        progress = min(max(step - self.warmup, 0) / span, 1.0)
        return self.min_lr + (self.peak - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        base = self.lr_at(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = base * group.get("lr_scale", 1.0)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self._apply()

"""QuickGELU, ``x · σ(1.702 x)`` (OpenAI CLIP's activation), with a one-pass backward.

open_clip writes it as two element-wise products around a sigmoid, so autograd keeps ``x`` and
``σ(1.702 x)`` and its backward takes five passes over the ``(B, L, 4D)`` hidden tensor. Its
derivative is SiLU's at ``z = 1.702 x``: ``d/dx [x σ(1.702 x)] = σ(z) + z σ(z)(1 − σ(z)) = silu'(z)``,
so this one keeps ``z`` alone and calls ``silu_backward`` once. The forward is open_clip's expression,
bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

SCALE = 1.702


class _QuickGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001 - autograd's ctx
        z = SCALE * x
        ctx.save_for_backward(z)
        return x * torch.sigmoid(z)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        (z,) = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad, z)


class QuickGELU(nn.Module):
    """``(..., C) → (..., C)``: ``x · σ(1.702 x)``, its gradient through a single ``silu_backward``."""

    def forward(self, x: Tensor) -> Tensor:
        return _QuickGELU.apply(x)

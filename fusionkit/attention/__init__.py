"""Attention: kernels (xformers / SDPA / eager), token layouts and windows, the attention module.

Everything in fusionkit that attends goes through :func:`attention` (directly or through
:class:`Attention`); windows regroup tokens of a :class:`TokenLayout` around it.
"""

from fusionkit.attention.kernels import (
    BACKENDS,
    AttentionRecord,
    BlockDiagonal,
    attention,
    attention_label,
    fused_kernel_ops,
    recording,
    requested_backend,
    resolve_backend,
    use_backend,
    xformers_available,
)
from fusionkit.attention.layout import TokenLayout
from fusionkit.attention.multihead import Attention
from fusionkit.attention.windows import Global, Local, Ragged, Space, Time, Window, WindowPlan, make_window, windowed

__all__ = [
    "BACKENDS", "Attention", "AttentionRecord", "BlockDiagonal", "Global", "Local", "Ragged", "Space", "Time", "TokenLayout",
    "Window", "WindowPlan", "attention", "attention_label", "fused_kernel_ops", "make_window", "recording", "requested_backend", "resolve_backend", "use_backend",
    "windowed", "xformers_available",
]

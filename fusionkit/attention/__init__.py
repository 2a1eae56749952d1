"""Attention: kernels (xformers / SDPA / eager), token layouts and windows, the attention module.

Everything in fusionkit that attends goes through :func:`attention` (directly or through
:class:`Attention`); windows regroup tokens of a :class:`TokenLayout` around it.
"""

from fusionkit.attention.kernels import (
    BACKENDS,
    BlockDiagonal,
    attention,
    requested_backend,
    resolve_backend,
    use_backend,
    xformers_available,
)
from fusionkit.attention.layout import TokenLayout
from fusionkit.attention.multihead import Attention
from fusionkit.attention.windows import Global, Local, Ragged, Space, Time, Window, WindowPlan, make_window, windowed

__all__ = [
    "BACKENDS", "Attention", "BlockDiagonal", "Global", "Local", "Ragged", "Space", "Time", "TokenLayout",
    "Window", "WindowPlan", "attention", "make_window", "requested_backend", "resolve_backend", "use_backend",
    "windowed", "xformers_available",
]

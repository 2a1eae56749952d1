"""Where and in which precision the engine runs: the device of ``train.device`` and autocast of a precision.

Shared by training, evaluation and prediction (the recipe keys ``train.device``, ``train.precision`` and
``eval.precision``, see ``docs/engine.md``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from fusionkit.engine import distributed

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    """The device named ``name``; ``auto`` is the local rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", distributed.info().local_rank)
        return torch.device("cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``bf16`` / ``fp16`` (CPU included), a null context for ``fp32``."""
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

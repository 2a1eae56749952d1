"""Where and in which precision the engine runs: the device of ``train.device``, autocast of a precision,
and frozen weights kept in that precision (``train.frozen_precision``).

Shared by training, evaluation and prediction (the recipe keys ``train.device``, ``train.precision``,
``train.frozen_precision`` and ``eval.precision``, see ``docs/engine.md``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

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


MATMUL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # what autocast runs in the lower precision


def cast_frozen(model: nn.Module, precision: str) -> int:
    """Store the weights of every frozen Linear / Conv layer (all of its parameters ``requires_grad=False``)
    in ``precision``'s dtype, once, instead of autocast casting them at every call (autocast caches casts
    of trainable weights only). Autocast rounds an fp32 weight to the same bf16 / fp16 value, so the
    outputs under ``autocast(precision)`` do not change; norms, embeddings, scales and every trainable
    tensor stay fp32. Returns the number of tensors cast (``fp32``: none)."""
    dtype = DTYPES[precision]
    if dtype is None:
        return 0
    cast = 0
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, MATMUL_LAYERS) and params and not any(p.requires_grad for p in params):
            for p in params:
                p.data = p.data.to(dtype)
            cast += len(params)
    return cast

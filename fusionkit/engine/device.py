"""Where and in which precision the engine runs: the device of ``train.device`` (on CPU with the
allocator set for large tensors), autocast of a precision, and frozen weights kept in that precision
(``train.frozen_precision``).

Shared by training, evaluation and prediction (the recipe keys ``train.device``, ``train.precision``,
``train.frozen_precision`` and ``eval.precision``, see ``docs/engine.md``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
from typing import Any

import torch
from torch import nn

from fusionkit.engine import distributed

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    """The device named ``name``; ``auto`` is the local rank's GPU when CUDA is available, else the CPU.
    On the CPU the process's allocator is set for large tensors first (:func:`keep_cpu_heap`)."""
    if name == "auto":
        name = f"cuda:{distributed.info().local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cpu":
        keep_cpu_heap()
    return device


CPU_HEAP_BYTES = 1 << 30  # glibc's mmap and trim thresholds under keep_cpu_heap
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


@functools.cache
def keep_cpu_heap() -> bool:
    """Let glibc's malloc serve CPU tensors up to 1 GiB from its heap and keep up to 1 GiB freed there.

    By default glibc maps every block above its mmap threshold (at most 32 MiB) afresh and unmaps it on
    free, so each such tensor faults in all of its pages at every step: the MLP hidden states of CLIP's 16
    frames in fp32 (39 MB) or eager attention's scores on VideoMAE's 1568 keys. On a CAST forward in fp32
    that is ~360k page faults and 11 % of the time (docs/benchmarks.md). With both thresholds at
    :data:`CPU_HEAP_BYTES` the pages are reused; the process keeps up to 1 GiB it freed (CAST train
    step, 16 frames, batch 2: 7–11 % faster, peak RSS equal, +0.4 GB with recompute). Process-wide and
    once; returns whether it applied: glibc only, and not when the environment sets
    ``FUSIONKIT_CPU_HEAP=system`` (glibc's own thresholds)."""
    if os.environ.get("FUSIONKIT_CPU_HEAP", "keep") == "system":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, CPU_HEAP_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, CPU_HEAP_BYTES))


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

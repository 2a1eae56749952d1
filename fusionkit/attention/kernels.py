"""Attention kernels: the only place in fusionkit that knows about xformers or SDPA.

Entry point :func:`attention` computes ``softmax(q kᵀ · scale + bias) v`` for tensors in the
``(B, H, L, K)`` layout (batch, heads, tokens, head dim) with one of three backends:

========  ==================================================================================
eager     reference maths in plain PyTorch (tests compare everything against it)
sdpa      ``torch.nn.functional.scaled_dot_product_attention``
xformers  ``xformers.ops.memory_efficient_attention`` (CUDA only; imported lazily; BMHK layout)
========  ==================================================================================

``auto`` (the default) picks xformers for CUDA tensors of a dtype it has a kernel for; on CPU the eager
kernel for bf16 / fp16 calls that autograd records with fewer than ``CPU_EAGER_TRAINING_KEYS`` keys (its
backward is faster there); else SDPA.
Force one with :func:`use_backend` (a context manager) or the environment variable
``FUSIONKIT_ATTENTION`` (``eager`` / ``sdpa`` / ``xformers`` / ``auto``).

Biases: ``None``; a float tensor added to the logits; a bool tensor (``True`` = may attend);
or a :class:`BlockDiagonal` (ragged sequences packed along the token axis, which becomes an
xformers ``BlockDiagonalMask`` on CUDA and a materialised mask elsewhere).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fusionkit.errors import FusionkitError
from fusionkit.logs import quiet
from fusionkit.registry import KERNELS

BACKENDS = ("auto", "eager", "sdpa", "xformers")
ENV_VAR = "FUSIONKIT_ATTENTION"

_forced: list[str] = []


class BackendError(FusionkitError, RuntimeError):
    """A forced attention backend that cannot run here (xformers on a CPU tensor, xformers not importable)."""


class UnknownBackendError(BackendError, ValueError):
    """An attention backend name that is not one of :data:`BACKENDS`."""


@dataclass(frozen=True)
class BlockDiagonal:
    """Ragged sequences packed along the token axis: query sequence i (``q_seqlens[i]`` tokens)
    attends only to key sequence i (``kv_seqlens[i]`` tokens). Applies to every batch element."""

    q_seqlens: tuple[int, ...]
    kv_seqlens: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.q_seqlens) != len(self.kv_seqlens):
            raise ValueError(
                f"BlockDiagonal: {len(self.q_seqlens)} query sequences but {len(self.kv_seqlens)} key sequences"
            )

    @classmethod
    def self_attention(cls, seqlens: Sequence[int]) -> BlockDiagonal:
        return cls(tuple(int(s) for s in seqlens), tuple(int(s) for s in seqlens))

    def materialize(self, device: torch.device | None = None) -> Tensor:
        """The ``(Lq, Lk)`` bool mask, ``True`` where a query may attend a key (its size known without reading
        the lengths tensor, which ``torch.export`` needs)."""
        q_ids = torch.repeat_interleave(torch.arange(len(self.q_seqlens), device=device),
                                        torch.tensor(self.q_seqlens, device=device), output_size=sum(self.q_seqlens))
        k_ids = torch.repeat_interleave(torch.arange(len(self.kv_seqlens), device=device),
                                        torch.tensor(self.kv_seqlens, device=device), output_size=sum(self.kv_seqlens))
        return q_ids[:, None] == k_ids[None, :]


Bias = Tensor | BlockDiagonal | None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force an attention backend inside a ``with`` block (nestable)."""
    if name not in BACKENDS:
        raise UnknownBackendError(f"unknown attention backend {name!r}; valid: {', '.join(BACKENDS)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def requested_backend() -> str:
    """The backend asked for by :func:`use_backend`, else ``$FUSIONKIT_ATTENTION``, else ``auto``."""
    if _forced:
        return _forced[-1]
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise UnknownBackendError(f"${ENV_VAR}={name!r} is not a valid attention backend; valid: {', '.join(BACKENDS)}")
    return name


@functools.cache
def _xformers_ops():  # noqa: ANN202 - module or None
    """Import ``xformers.ops`` once, silencing the warning about its unloadable C++ extension."""
    import warnings

    try:
        with quiet("xformers"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import xformers.ops as xops
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return xops


def xformers_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether xformers has a kernel for tensors on ``device`` of ``dtype`` (CUDA only)."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16, torch.float32) and _xformers_ops() is not None


# `auto` on CPU in bf16 / fp16 while autograd records: eager below this many keys. The eager backward is
# batched matmuls; SDPA's CPU backward is 2-2.5x slower there (CLIP frames, B-CA windows) but 2x faster at
# VideoMAE's 1568 keys (docs/benchmarks.md, "Attention kernels ... training").
CPU_EAGER_TRAINING_KEYS = 1024


# The dispatcher ops SDPA's fused kernels run as (CPU flash; CUDA flash, memory-efficient, cuDNN).
_FUSED_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")


@functools.cache
def fused_kernel_ops() -> frozenset[torch._ops.OpOverload]:
    """The ops of the fused attention kernels that this torch build has: the outputs worth keeping under
    activation checkpointing, since recomputing them costs ``O(L² K)`` work for an ``(B, H, L, K)`` output
    and a ``(B, H, L)`` log-sum-exp. The eager kernel's matmuls are not among them (nor xformers' ops: the
    checkpoint recomputes those)."""
    aten = torch.ops.aten
    return frozenset(getattr(aten, name).default for name in _FUSED_OPS if hasattr(aten, name))


def resolve_backend(q: Tensor, k: Tensor | None = None) -> str:
    """The backend that :func:`attention` uses for queries ``q`` ``(B, H, Lq, K)`` and keys ``k``
    ``(B, H, Lk, K)`` (default: ``q``) right now. ``auto``: xformers where it has a kernel (CUDA); on CPU
    the eager kernel for a bf16 / fp16 call that autograd records with fewer than
    :data:`CPU_EAGER_TRAINING_KEYS` keys; else SDPA."""
    name = requested_backend()
    if name == "auto":
        if xformers_available(q.device, q.dtype):
            return "xformers"
        k = q if k is None else k
        short_training = (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
                          and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
                          and k.shape[-2] < CPU_EAGER_TRAINING_KEYS)
        return "eager" if short_training else "sdpa"
    if name == "xformers" and not xformers_available(q.device, q.dtype):
        how = "use_backend('xformers')" if _forced else f"${ENV_VAR}=xformers"
        raise BackendError(
            f"attention backend 'xformers' was forced ({how}) but has no kernel for {q.dtype} on {q.device.type} "
            "(xformers' memory_efficient_attention runs on CUDA only); use 'sdpa' or 'auto'"
        )
    return name


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Bias = None, dropout_p: float = 0.0,
              scale: float | None = None) -> Tensor:
    """Multi-head attention ``softmax(q kᵀ · scale + bias) v``.

    Args:
        q: queries ``(B, H, Lq, K)``.
        k: keys ``(B, H, Lk, K)``.
        v: values ``(B, H, Lk, Kv)``.
        bias: ``None``, additive float tensor or bool mask broadcastable to ``(B, H, Lq, Lk)``
            (``True`` = may attend), or a :class:`BlockDiagonal`.
        dropout_p: attention dropout probability (apply only in training).
        scale: logit scale, default ``K ** -0.5``.

    Returns:
        ``(B, H, Lq, Kv)``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects (B, H, L, K) tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if isinstance(bias, BlockDiagonal):
        if sum(bias.q_seqlens) != q.shape[2] or sum(bias.kv_seqlens) != k.shape[2]:
            raise ValueError(f"BlockDiagonal covers {sum(bias.q_seqlens)} queries / {sum(bias.kv_seqlens)} keys "
                             f"but q has {q.shape[2]} and k has {k.shape[2]} tokens")
    if _records and any(name is not None for name, _ in _labels):
        return _recorded(q, k, v, bias, scale)
    return KERNELS.get(resolve_backend(q, k))(q, k, v, bias, dropout_p, scale)


@dataclass(frozen=True)
class AttentionRecord:
    """One call of :func:`attention` under :func:`recording`: ``label`` (the :func:`attention_label`
    stack joined by ``/``, e.g. ``bca/3/t2s``), its ``weights`` ``(B', H, Lq, Lk)`` (float32, CPU;
    ``B'`` = batch × windows when the caller regrouped tokens into windows; masked keys have 0) and
    ``context``: what the callers around it stated (an operator's ``query`` / ``key`` expert,
    :func:`~fusionkit.attention.windowed`'s ``key_plan``, ``key_layout`` and ``key_batch``)."""

    label: str
    weights: Tensor
    context: Mapping[str, Any] = field(default_factory=dict)


_labels: list[tuple[str | None, dict[str, Any]]] = []  # (name or None, context) of the enclosing blocks
_records: list[list[AttentionRecord]] = []


@contextlib.contextmanager
def attention_label(name: str | None, **context: Any) -> Iterator[None]:
    """Name the attention calls inside the block (nestable: names join with ``/``) and state facts about
    them (``context``, inner blocks win). Shared mechanisms (the fusion graph: ``<operator>/<step>``) and
    operators (a direction, its ``query`` / ``key`` experts) set them; only named calls are recorded."""
    _labels.append((name, context))
    try:
        yield
    finally:
        _labels.pop()


def is_recording() -> bool:
    """Whether a :func:`recording` is active (callers skip stating context otherwise)."""
    return bool(_records)


@contextlib.contextmanager
def recording() -> Iterator[list[AttentionRecord]]:
    """Collect the weights of every labelled :func:`attention` call inside the block (computed by the
    eager maths, without dropout: for inspection under ``torch.no_grad``, never for training)."""
    out: list[AttentionRecord] = []
    _records.append(out)
    try:
        yield out
    finally:
        _records.pop()


def _recorded(q: Tensor, k: Tensor, v: Tensor, bias: Bias, scale: float | None) -> Tensor:
    """The eager maths of :func:`eager_attention`, keeping the softmax weights in the active recording."""
    weights = attention_weights(q, k, bias, scale)
    label = "/".join(name for name, _ in _labels if name is not None)
    context = {key: value for _, ctx in _labels for key, value in ctx.items()}
    _records[-1].append(AttentionRecord(label, weights.detach().float().cpu(), context))
    return weights @ v


def _dense_bias(bias: Bias, device: torch.device) -> Tensor | None:
    return bias.materialize(device) if isinstance(bias, BlockDiagonal) else bias


def attention_weights(q: Tensor, k: Tensor, bias: Bias = None, scale: float | None = None) -> Tensor:
    """``softmax(q kᵀ · scale + bias)`` ``(B, H, Lq, Lk)``: the eager kernel's weights (masked keys 0)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)
    dense = _dense_bias(bias, q.device)
    if dense is not None:
        logits = logits.masked_fill(~dense, float("-inf")) if dense.dtype == torch.bool else logits + dense
    return logits.softmax(dim=-1)


@KERNELS.register("eager")
def eager_attention(q: Tensor, k: Tensor, v: Tensor, bias: Bias = None, dropout_p: float = 0.0,
                    scale: float | None = None) -> Tensor:
    """Reference maths in plain PyTorch (softmax of scaled logits); slow, exact, for tests."""
    weights = attention_weights(q, k, bias, scale)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


@KERNELS.register("sdpa")
def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, bias: Bias = None, dropout_p: float = 0.0,
                   scale: float | None = None) -> Tensor:
    """PyTorch scaled_dot_product_attention (flash / memory-efficient / math, chosen by PyTorch)."""
    bias = _dense_bias(bias, q.device)
    if bias is not None and bias.dtype != torch.bool:
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


@KERNELS.register("xformers")
def xformers_attention(q: Tensor, k: Tensor, v: Tensor, bias: Bias = None, dropout_p: float = 0.0,
                       scale: float | None = None) -> Tensor:
    """xformers memory_efficient_attention on CUDA (BMHK layout; block-diagonal masks native)."""
    xops = _xformers_ops()
    if xops is None:
        raise BackendError("attention backend 'xformers': xformers is not importable; use 'sdpa' or 'auto'")
    B, H, Lq, _ = q.shape
    qx, kx, vx = (t.transpose(1, 2) for t in (q, k, v))  # (B, L, H, K)
    if isinstance(bias, BlockDiagonal):
        from xformers.ops import fmha

        mask = fmha.BlockDiagonalMask.from_seqlens(list(bias.q_seqlens) * B, list(bias.kv_seqlens) * B)
        flat = [t.reshape(1, B * t.shape[1], H, t.shape[-1]) for t in (qx, kx, vx)]
        out = xops.memory_efficient_attention(*flat, attn_bias=mask, p=dropout_p, scale=scale)
        return out.reshape(B, Lq, H, -1).transpose(1, 2)
    if bias is not None:
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(~bias, float("-inf"))
        Lk = k.shape[2]
        # xformers wants a dense (B, H, Lq, Lk) bias whose last dim is stored 8-aligned
        pad = (-Lk) % 8
        full = torch.zeros(B, H, Lq, Lk + pad, dtype=q.dtype, device=q.device)
        full[..., :Lk] = bias.to(q.dtype)
        bias = full[..., :Lk]
    out = xops.memory_efficient_attention(qx, kx, vx, attn_bias=bias, p=dropout_p, scale=scale)
    return out.transpose(1, 2)

"""Trainable parameters that get no gradient: found before the first step, reported after it.

Two kinds, both named in one warning after the first optimizer step (:func:`report`):

* **unused**: outside the autograd graph of every head's logits, so their ``grad`` stays ``None``.
  ``DistributedDataParallel`` with ``find_unused_parameters=False`` fails on them at the second step
  ("Expected to have finished reduction in the prior iteration"); with the default
  ``train.distributed.find_unused_parameters: auto`` the trainer turns that option on exactly when
  :func:`probe` finds some (it costs DDP a traversal of the graph every step, so it is off otherwise).
* **zero**: in the graph, but their gradient is zero whatever the weights. The ``tiny`` and ``cast``
  recipes have six: the last step's T2S cross-attention of B-CA (``fusions.bca.<last>.cross.t2s.*``).
  B-CA leaves the CLS tokens out of the cross-attention (their output is their own bottleneck
  vector, chosen by ``torch.where``), the noun head pools the spatial expert's CLS, and after the last
  layer nothing carries the patch tokens' update to it. DDP treats them as used (a zero gradient is
  still a gradient), so they need nothing but the warning; freeze them (``trainable.freeze``) to
  save their optimizer state.

:func:`probe` runs one forward and backward of the model alone on standard-normal inputs of its
``input_shapes`` (the modalities its experts read, batch 2) with every all-zero parameter
(zero-initialised up-projections, adapters, layer scales) temporarily random, so that a zero init
does not hide the gradient of what feeds it. The RNG states are forked, buffers (BatchNorm
statistics), the zeroed parameters, the training mode and ``grad`` are restored: the run continues
exactly as without the probe.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

BATCH = 2
SHOWN = 6  # names listed in a message, then "and N more"


@dataclass(frozen=True)
class GradientProbe:
    """Names of the trainable parameters the probe found ``unused`` (no gradient) and ``zero`` (zero gradient)."""

    unused: tuple[str, ...] = ()
    zero: tuple[str, ...] = ()


def probe(model: nn.Module, device: torch.device | str = "cpu") -> GradientProbe:
    """The trainable parameters of ``model`` (a :class:`~fusionkit.graph.FusionModel`) that one backward
    leaves without a gradient, or with a zero one whatever the weights (see the module docstring)."""
    params = dict(model.named_parameters())
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    if not trainable or not hasattr(model, "input_shapes"):
        return GradientProbe()
    device = torch.device(device)
    saved = {n: p.grad for n, p in trainable.items()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    was_training = model.training
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        zeroed = _randomise_zeros(params.values())
        try:
            model.train()
            for p in trainable.values():
                p.grad = None
            _backward(model, device)
            unused = tuple(n for n, p in trainable.items() if p.grad is None)
            zero = tuple(n for n, p in trainable.items() if p.grad is not None and not bool(p.grad.any()))
        finally:
            with torch.no_grad():
                for p in zeroed:
                    p.zero_()
                for n, b in model.named_buffers():
                    b.copy_(buffers[n])
            for n, p in trainable.items():
                p.grad = saved[n]
            model.train(was_training)
    return GradientProbe(unused, zero)


def _randomise_zeros(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Fill every all-zero floating-point parameter with ``N(0, 0.02²)``; returns them (to zero again)."""
    out = []
    with torch.no_grad():
        for p in params:
            if p.is_floating_point() and p.numel() and not bool(p.any()):
                p.normal_(0.0, 0.02)
                out.append(p)
    return out


def _backward(model: nn.Module, device: torch.device) -> None:
    """One backward of a random projection of every head's logits ``(B, C)``, from standard-normal inputs."""
    read = {e.modality for e in getattr(model, "experts", {}).values()} or set(model.input_shapes)
    inputs = {m: torch.randn(BATCH, *shape, device=device) for m, shape in model.input_shapes.items() if m in read}
    logits = model(inputs)
    loss = sum((x.float() * torch.randn_like(x, dtype=torch.float32)).sum() for x in logits.values())
    loss.backward()


def missing_grads(model: nn.Module) -> list[str]:
    """The trainable parameters whose ``grad`` is ``None`` (after a backward: those the step left out)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def names(items: Sequence[str]) -> str:
    """``a, b, c and 4 more``: at most :data:`SHOWN` names."""
    shown = ", ".join(items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def report(found: GradientProbe, missing: Sequence[str] = (), ddp: bool | None = None) -> str | None:
    """The warning after the first step (``None`` when every trainable parameter got a gradient):
    the unused ones (the probe's and those the step left without ``grad``), the zero ones, and what
    DDP does about them (``ddp``: its ``find_unused_parameters``; ``None``: not distributed)."""
    unused = list(dict.fromkeys([*found.unused, *missing]))
    parts = []
    if unused:
        parts.append(f"{len(unused)} trainable parameter tensor(s) get no gradient (outside the graph of every "
                     f"head): {names(unused)}")
    if found.zero:
        parts.append(f"{len(found.zero)} trainable parameter tensor(s) get a zero gradient whatever the weights "
                     f"(nothing carries their output to a head): {names(list(found.zero))}")
    if not parts:
        return None
    tail = "" if ddp is None else f"; DDP find_unused_parameters={ddp}"
    return "warning: " + "; ".join(parts) + f" (freeze them with trainable.freeze){tail}"


def find_unused(setting: str | bool, found: GradientProbe) -> bool:
    """DDP's ``find_unused_parameters`` for ``train.distributed.find_unused_parameters`` (``auto``: only
    when the probe found unused parameters); ``false`` with unused parameters is an error naming them."""
    from fusionkit.recipes import RecipeError

    if setting == "auto":
        return bool(found.unused)
    if not setting and found.unused:
        raise RecipeError(f"train.distributed.find_unused_parameters is false but {len(found.unused)} trainable "
                          f"parameter tensor(s) get no gradient ({names(list(found.unused))}): DDP would fail at "
                          "the second step; set it to auto (the default) or true, or freeze them (trainable.freeze)")
    return bool(setting)

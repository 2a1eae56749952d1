"""Distributed training helpers: process group from torchrun's environment, DDP / FSDP wrapping,
a resumable distributed sampler, and metric synchronisation.

``torchrun --nproc_per_node N -m fusionkit train RECIPE`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init` reads them (multi-node:
``torchrun --nnodes M --node_rank i --rdzv_endpoint host:port ...``). Without them everything
runs in one process and every helper here is a no-op.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return DistInfo()


def init(backend: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the process group described by torchrun's environment (no-op without ``WORLD_SIZE > 1``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return info()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return info()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if info().enabled:
        dist.barrier()


def all_reduce_sum(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum a few floats over all ranks (one collective)."""
    if not info().enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list in rank order) on every rank."""
    if not info().enabled:
        return [obj]
    out: list[Any] = [None] * info().world_size
    dist.all_gather_object(out, obj)
    return out


def wrap(model: nn.Module, device: torch.device, fsdp: bool = False, find_unused_parameters: bool = False) -> nn.Module:
    """DDP around ``model`` when distributed (the model itself otherwise); with ``fsdp``, FSDP2
    (``fully_shard``, CPU and CUDA) shards the model in place and returns it.

    FSDP shards the parameters, gradients and optimizer state over the ranks between steps; the
    forward gathers the whole model (the root is the only sharded unit, because the fusion graph
    calls the experts' step methods and operators reach into the frozen layers).
    """
    if not info().enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        with torch.no_grad():  # every rank starts from rank 0's weights, as DDP guarantees
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)
        fully_shard(model)
        return model
    ids = [device.index if device.index is not None else info().local_rank] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The user model inside DDP (FSDP2 shards the model in place)."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The complete state dict of a (possibly FSDP-sharded) model, on the CPU, names as in the user
    model (a collective under FSDP: every rank must call it)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # on every rank
        return {k: v.cpu() for k, v in state.items()}
    return unwrap(model).state_dict()


class ShardedSampler(Sampler[int]):
    """Epoch-seeded shuffled indices, sharded over ranks, able to start part-way through an epoch.

    Epoch ``e`` permutes the dataset with a generator seeded ``seed + e`` (or keeps the order), pads
    it to a multiple of ``world_size`` by repeating the start (like ``DistributedSampler``), and
    rank ``r`` takes positions ``r, r + W, r + 2W, …``: the union of the ranks' ``i``-th batches is
    the ``i``-th global batch of one process with a ``W``-times larger batch. :meth:`set_epoch`
    with ``start`` skips the first ``start`` indices of this rank (resuming mid-epoch).
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, pad: bool = True) -> None:
        d = info()
        self.size, self.shuffle, self.seed = int(size), bool(shuffle), int(seed)
        self.rank = d.rank if rank is None else int(rank)
        self.world_size = d.world_size if world_size is None else int(world_size)
        self.pad = pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.pad and self.world_size > 1:
            total = math.ceil(self.size / self.world_size) * self.world_size
            order = (order * math.ceil(total / max(len(order), 1)))[:total]
        return order[self.rank:: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return max(len(self.indices()) - self.start, 0)

    def full_length(self) -> int:
        return len(self.indices())

"""DataLoader construction with deterministic seeding across workers.

PyTorch seeds ``torch`` in worker ``i`` with ``base_seed + i``, where ``base_seed`` is drawn from
the loader's ``generator`` at the start of every epoch. :func:`build_loader` gives the loader a
generator seeded with ``seed`` and :func:`seed_worker` derives ``random`` and ``numpy`` from that
same worker seed, so two loaders built with the same seed and the same ``num_workers`` yield the
same batches, augmentations included, while every epoch and every worker still differs.
(A :class:`~fusionkit.data.dataset.ManifestDataset` with its own ``seed`` is reproducible for any
worker count; see its docstring.)
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fusionkit.data.collate import collate


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed ``random`` and ``numpy`` from the seed PyTorch gave this worker's ``torch``."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


worker_init_fn = seed_worker


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0, seed: int = 0,
                 sampler: Sampler | None = None, drop_last: bool = False, **kwargs: Any) -> DataLoader:
    """A ``DataLoader`` with :func:`~fusionkit.data.collate.collate`, :func:`seed_worker` and a generator
    seeded with ``seed``; ``shuffle`` is ignored when a ``sampler`` is given (e.g. a ``DistributedSampler``,
    whose own seed and ``set_epoch`` then decide the order). Further keyword arguments go to ``DataLoader``
    (``pin_memory``, ``persistent_workers``, ``prefetch_factor``, ...)."""
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=bool(shuffle) if sampler is None else False,
                      sampler=sampler, num_workers=num_workers, collate_fn=kwargs.pop("collate_fn", collate),
                      worker_init_fn=seed_worker, generator=generator, drop_last=drop_last, **kwargs)

"""A deterministic in-memory dataset whose labels are painted into the clips (engine tests, demos).

Item ``k`` is a dict in the contract of every fusionkit dataset:

* ``video`` ``(3, T, H, W)`` float: small noise plus, for each head, a constant offset in one
  channel that encodes the class (head 0 in channel 0, head 1 in channel 1, ...), so a tiny model
  learns it in a few steps;
* ``audio`` ``(samples,)`` float: a sine whose frequency encodes the first head's class, plus noise;
* ``labels`` ``{head: int64 scalar}``; ``clip_id`` (views of one clip share it); ``path``; ``modalities``
  (the stream keys, which the batch declares).

Everything is a pure function of ``(seed, k)``: two datasets with the same options are equal and
item ``k`` does not depend on the order of reads. ``corrupt`` lists items that behave like an
undecodable file (the item is a :class:`~fusionkit.data.collate.Skipped`, which
:func:`~fusionkit.data.collate.collate` drops and lists, as for a real file);
``nan`` lists items whose video is NaN (to exercise the non-finite loss guard).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from fusionkit.data.collate import Skipped
from fusionkit.registry import DATASETS


@DATASETS.register("synthetic")
class SyntheticDataset(Dataset):
    """Deterministic synthetic clips whose labels are painted into the video (learnable by a tiny model).

    Args:
        size: number of items (views included).
        frames, image_size: clip shape ``(3, frames, image_size, image_size)``.
        samples: audio waveform length (0: no audio).
        classes: head name → number of classes (``{verb: 4, noun: 5}``).
        seed: makes the dataset (labels and noise); item ``k`` depends on ``(seed, k)`` only.
        views: items per clip (consecutive items share ``clip_id`` and labels; multi-view testing).
        noise: amplitude of the noise added to the class pattern.
        corrupt: indices of items that fail like an undecodable file.
        nan: indices of items whose video is NaN.
    """

    def __init__(self, size: int = 64, frames: int = 4, image_size: int = 32, samples: int = 1600,
                 classes: Mapping[str, int] | None = None, seed: int = 0, views: int = 1, noise: float = 0.1,
                 corrupt: Sequence[int] = (), nan: Sequence[int] = ()) -> None:
        classes = dict(classes or {"verb": 4, "noun": 5})
        if size < 1 or frames < 1 or image_size < 1 or samples < 0 or views < 1:
            raise ValueError(f"synthetic: size, frames, image_size, views must be positive and samples >= 0; got "
                             f"size={size}, frames={frames}, image_size={image_size}, samples={samples}, views={views}")
        if not classes or any(int(c) < 1 for c in classes.values()):
            raise ValueError(f"synthetic: classes must map heads to positive counts, got {classes}")
        if len(classes) > 3:
            raise ValueError(f"synthetic: at most 3 heads (one video channel each), got {list(classes)}")
        self.size, self.frames, self.image_size, self.samples = int(size), int(frames), int(image_size), int(samples)
        self.classes = {h: int(c) for h, c in classes.items()}
        self.seed, self.views, self.noise = int(seed), int(views), float(noise)
        self.corrupt, self.nan = {int(i) % self.size for i in corrupt}, {int(i) % self.size for i in nan}

    @property
    def modalities(self) -> list[str]:
        """The streams of its items: ``video``, and ``audio`` unless ``samples`` is 0."""
        return ["video", "audio"] if self.samples else ["video"]

    def __len__(self) -> int:
        return self.size

    def _generator(self, key: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + key)

    def labels(self, k: int) -> dict[str, int]:
        """Labels of item ``k`` (shared by the views of its clip)."""
        g = self._generator(-1 - k // self.views)
        return {h: int(torch.randint(c, (), generator=g)) for h, c in self.classes.items()}

    def __getitem__(self, k: int) -> dict[str, Any] | Skipped:
        if not 0 <= k < self.size:
            raise IndexError(f"synthetic: index {k} out of range for {self.size} items")
        clip = k // self.views
        path = f"synthetic://{self.seed}/{clip}/{k % self.views}"
        if k in self.corrupt:
            return Skipped(path, "synthetic corrupt item (cannot decode)", f"clip{clip}")
        labels = self.labels(k)
        g = self._generator(k)
        video = self.noise * torch.randn(3, self.frames, self.image_size, self.image_size, generator=g)
        for channel, (h, c) in enumerate(self.classes.items()):
            video[channel] += 2.0 * labels[h] / max(c - 1, 1) - 1.0
        if k in self.nan:
            video.fill_(math.nan)
        item: dict[str, Any] = {"video": video, "labels": {h: torch.tensor(v, dtype=torch.int64) for h, v in labels.items()},
                                "clip_id": f"clip{clip}", "path": path}
        if self.samples:
            first = next(iter(labels.values()))
            t = torch.arange(self.samples, dtype=torch.float32) / 16000.0
            item["audio"] = torch.sin(2 * math.pi * 200.0 * (1 + first) * t) + self.noise * torch.randn(
                self.samples, generator=g)
        item["modalities"] = tuple(self.modalities)
        return item

    def example(self, k: int = 0) -> dict[str, Tensor]:
        """The modality tensors of item ``k`` only (for ``predict`` and demos)."""
        item = self[k]
        return {key: item[key] for key in ("video", "audio") if key in item}

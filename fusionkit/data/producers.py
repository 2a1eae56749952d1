"""Modalities and their data producers: every stream a dataset can put in a batch, registered by name.

An expert reads one batch key (``Expert.modality``); that key must be a registered modality
(``fusionkit.registry.MODALITIES``, listed by ``fusionkit list``) whose producer a dataset runs. The
built-ins are decoded by :class:`~fusionkit.data.dataset.ManifestDataset` itself (``builtin = True``):

=============  =====================  ===================================================
``video``      ``(3, T, H, W)``       the sampled RGB frames, transformed and normalised
``audio``      ``(samples,)``         mono waveform (or front-end features ``(frames, F)``)
``motion``     ``(2, T, H, W)``       the codec's motion vectors (:mod:`fusionkit.data.motion`)
``iframe``     ``(3, T, H, W)``       the keyframe of each sampled frame's GOP (:mod:`~fusionkit.data.compressed`)
``residual``   ``(3, T, H, W)``       motion-compensated residuals (:mod:`~fusionkit.data.compressed`)
=============  =====================  ===================================================

A plugin adds a modality computed from the frames a clip samples by subclassing :class:`FrameStream`
(``examples/fusionkit-flow``: optical flow)::

    @MODALITIES.register("flow")
    class Flow(FrameStream):
        '''Optical flow of each sampled frame from the frame before it, (2, T, H, W).'''

        channels, vectors = 2, True

        def decode(self, path, numbers, info):      # -> float32 (2, T, H, W) at the file's resolution
            ...

:class:`~fusionkit.data.dataset.ManifestDataset` (``modalities: [video, flow]``) calls ``decode`` with
the frame numbers it sampled for the clip (remembered by the decoded-media memory when it is on), then
passes the field through the video's own crop / resize / flip draw: a field with ``vectors = True``
holds ``(dx, dy)`` displacements in pixels, rescaled into output pixels and mirrored with the video as
the motion vectors are (:func:`fusionkit.data.motion.geometric`); any other field is only cropped,
resized and flipped (no colour augmentation). :meth:`FrameStream.finish` then maps it to what the
batch holds (identity by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from fusionkit.data.decode import DecodeError, MediaInfo
from fusionkit.errors import FusionkitError
from fusionkit.registry import MODALITIES

BUILTIN_STREAMS = {  # name → what the batch holds (``fusionkit list`` shows it)
    "video": "RGB frames (3, T, H, W), normalised: the sampled frames after the train / test transform",
    "audio": "Mono waveform (samples,) at audio.sample_rate, or front-end features (frames, F)",
    "motion": "Codec motion vectors (2, T, H, W), dx / dy in output pixels (fusionkit.data.motion)",
    "iframe": "The keyframe starting each sampled frame's GOP (3, T, H, W), normalised as the video",
    "residual": "Motion-compensated residuals (3, T, H, W) in the video's units (fusionkit.data.compressed)",
}
BUILTIN = tuple(BUILTIN_STREAMS)


class ModalityError(FusionkitError, ValueError):
    """A modality that no data producer gives (the message names the registered ones)."""


class Modality:
    """A stream of a batch. ``builtin``: decoded by the datasets' own code (no producer to call)."""

    builtin: bool = False


class FrameStream(Modality):
    """A visual modality computed from the frames a clip samples (the base of plugin producers).

    Attributes:
        channels: ``C`` of the field :meth:`decode` returns.
        vectors: channels 0 and 1 are ``(dx, dy)`` displacements in pixels (then ``C == 2``): they
            are rescaled with the video's resize and ``dx`` changes sign under its flip.
    """

    channels: int = 1
    vectors: bool = False

    def decode(self, path: str | Path, numbers: Sequence[int], info: MediaInfo) -> np.ndarray:
        """The field of frames ``numbers`` of ``path``: float32 ``(C, T, H, W)`` at the file's resolution
        (``H, W = info.height, info.width``), ``T = len(numbers)``; :class:`DecodeError` when it cannot."""
        raise NotImplementedError

    def finish(self, field: Tensor) -> Tensor:
        """The batch entry ``(C, T, h, w)`` of a field after the video's crop / resize / flip (identity)."""
        return field

    def checked(self, name: str, field: np.ndarray, numbers: Sequence[int], info: MediaInfo) -> np.ndarray:
        """``field`` as float32 ``(C, T, H, W)``, or a :class:`DecodeError` naming the modality and the shapes."""
        want = (self.channels, len(numbers), info.height, info.width)
        field = np.asarray(field, dtype=np.float32)
        if field.shape != want:
            raise DecodeError(f"{info.path}: the {name!r} producer {type(self).__name__} gave a field of shape "
                              f"{field.shape}, expected (C, T, H, W) = {want}")
        return field


def producer(name: str) -> Modality:
    """The registered modality ``name`` (an instance); :class:`~fusionkit.registry.UnknownNameError` otherwise."""
    return MODALITIES.get(name)()


def frame_streams(names: Sequence[str]) -> dict[str, FrameStream]:
    """The plugin frame streams among ``names`` (built-ins left out), as producer instances."""
    out = {}
    for name in names:
        if name not in BUILTIN:
            stream = producer(name)
            if not isinstance(stream, FrameStream):
                raise ModalityError(f"modality {name!r} is registered by {type(stream).__name__}, not a "
                                    "FrameStream: ManifestDataset cannot produce it")
            out[name] = stream
    return out


class Builtin(Modality):
    """A stream :class:`~fusionkit.data.dataset.ManifestDataset` decodes itself (no producer to call)."""

    builtin = True


for _name, _what in BUILTIN_STREAMS.items():
    MODALITIES.register(_name, description=_what)(Builtin)


__all__ = ["BUILTIN", "BUILTIN_STREAMS", "Builtin", "FrameStream", "Modality", "ModalityError", "frame_streams", "producer"]

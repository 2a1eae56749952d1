"""Frame sampling: which frames of a clip's span a model sees.

Two schemes, both returning ``frames`` indices into ``range(num_frames)`` (the frames of the
item's time span, in presentation order):

* **dense** (Kinetics-400 style): ``frames`` frames ``stride`` apart, one window of
  ``(frames - 1) · stride + 1`` frames placed inside the span. ``position`` in ``[0, 1]`` places
  the window (0 = first frame, 1 = last possible start, 0.5 = centre); ``None`` draws it at random.
  A span shorter than the window repeats its last frame.
* **segment** (uniform segments, SSV2 / EPIC-KITCHENS style, TSN): the span is cut into ``frames``
  equal segments and one frame is taken from each, at ``position`` inside every segment (0.5 = the
  centre) or, with ``position=None``, at an independent random place in each segment.

Test-time clips (:func:`clip_positions`) spread ``n`` windows evenly: dense windows from the first
to the last possible start (SlowFast's convention), segment frames at ``(i + 0.5) / n`` inside
every segment.
"""

from __future__ import annotations

import math
import random

SCHEMES = ("dense", "segment")


def _check(num_frames: int, frames: int) -> None:
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if num_frames < 1:
        raise ValueError(f"a span needs at least one frame, got num_frames={num_frames}")


def _check_position(position: float | None) -> None:
    if position is not None and not 0.0 <= position <= 1.0:
        raise ValueError(f"position must lie in [0, 1] or be None (random), got {position}")


def dense_indices(num_frames: int, frames: int = 16, stride: int = 4, position: float | None = 0.5,
                  rng: random.Random | None = None) -> list[int]:
    """``frames`` indices ``stride`` apart, the window placed at ``position`` (``None``: random).

    Indices past the end of a short span are clamped to its last frame.
    """
    _check(num_frames, frames)
    _check_position(position)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    window = (frames - 1) * stride + 1
    slack = max(num_frames - window, 0)
    if position is None:
        start = (rng or random).randint(0, slack)
    else:
        start = int(round(slack * position))
    return [min(start + k * stride, num_frames - 1) for k in range(frames)]


def segment_indices(num_frames: int, frames: int = 16, position: float | None = 0.5,
                    rng: random.Random | None = None) -> list[int]:
    """One index per equal segment, at ``position`` inside each segment (``None``: random per segment)."""
    _check(num_frames, frames)
    _check_position(position)
    seg = num_frames / frames
    out = []
    for k in range(frames):
        u = (rng or random).random() if position is None else position
        out.append(min(int(math.floor(seg * k + seg * u)), num_frames - 1, int(math.ceil(seg * (k + 1))) - 1))
    return out


def sample_indices(scheme: str, num_frames: int, frames: int = 16, stride: int = 4,
                   position: float | None = 0.5, rng: random.Random | None = None) -> list[int]:
    """:func:`dense_indices` or :func:`segment_indices` by name (``stride`` only matters for dense)."""
    if scheme == "dense":
        return dense_indices(num_frames, frames, stride, position, rng)
    if scheme == "segment":
        return segment_indices(num_frames, frames, position, rng)
    raise ValueError(f"unknown sampling scheme {scheme!r}; choose one of {SCHEMES}")


def clip_positions(scheme: str, clips: int) -> list[float]:
    """``position`` of each of ``clips`` test-time clips (one clip: the centre)."""
    if clips < 1:
        raise ValueError(f"clips must be >= 1, got {clips}")
    if scheme == "segment":
        return [(i + 0.5) / clips for i in range(clips)]
    if clips == 1:
        return [0.5]
    return [i / (clips - 1) for i in range(clips)]


def crop_positions(crops: int) -> list[float]:
    """Where each of ``crops`` test crops sits along the long side (0 = start, 0.5 = centre, 1 = end)."""
    if crops < 1:
        raise ValueError(f"crops must be >= 1, got {crops}")
    if crops == 1:
        return [0.5]
    return [i / (crops - 1) for i in range(crops)]

"""Real media files for the data tests, written with PyAV (H.264 + AAC in MP4, PCM WAV).

The H.264 + AAC writer itself is :func:`fusionkit.data.encode.write_video` (re-exported here).

Frames encode their index as a flat grey level (``GREY_STEP · i``) so the sampled frame indices
can be read back from the decoded pixels; audio carries a 440 Hz tone switched on over a known
time interval so the cut can be checked against the frames' time span.
"""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np

from fusionkit.data.encode import LAYOUTS, write_video  # noqa: F401 - re-exported for the tests
from fusionkit.data.encode import encode_audio as _encode_audio

GREY_STEP = 5  # frame i is a flat grey image of value GREY_STEP * i (i < 51)
TONE_HZ = 440.0


def index_frames(num_frames: int, height: int = 48, width: int = 64) -> np.ndarray:
    """``(T, H, W, 3)`` uint8 frames, frame ``i`` flat grey ``GREY_STEP · i``."""
    if GREY_STEP * (num_frames - 1) > 255:
        raise ValueError(f"at most {255 // GREY_STEP + 1} frames can carry their index")
    grey = (np.arange(num_frames) * GREY_STEP).astype(np.uint8)
    return np.broadcast_to(grey[:, None, None, None], (num_frames, height, width, 3)).copy()


def frame_index(video) -> list[int]:
    """Frame indices read back from decoded frames (uint8 ``(T, H, W, 3)`` or ``(3, T, H, W)`` in [0, 255])."""
    arr = np.asarray(video, dtype=np.float64)
    axes = (1, 2, 3) if arr.shape[-1] == 3 else (0, 2, 3)
    return [int(round(v / GREY_STEP)) for v in arr.mean(axis=axes)]


def tone(seconds: float, rate: int, channels: int, on: tuple[float, float], amplitude: float = 0.5,
         only_channel: int | None = None) -> np.ndarray:
    """``(channels, samples)`` float32: a 440 Hz tone during ``on = (t0, t1)`` seconds, silence elsewhere.

    ``only_channel`` puts the tone in that channel alone (the others silent), to check the downmix.
    """
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    sig = np.where((t >= on[0]) & (t < on[1]), amplitude * np.sin(2 * math.pi * TONE_HZ * t), 0.0)
    out = np.zeros((channels, n), dtype=np.float32)
    if only_channel is None:
        out[:] = sig
    else:
        out[only_channel] = sig
    return out


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """16-bit PCM WAV of ``audio`` ``(C, n)`` float in [-1, 1]."""
    path = Path(path)
    with av.open(str(path), "w", format="wav") as out:
        st = out.add_stream("pcm_s16le", rate=sample_rate, layout=LAYOUTS[audio.shape[0]])
        _encode_audio(out, st, audio, sample_rate, planar=False)
    return path


def write_audio_only(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """AAC in an M4A container, no video stream."""
    path = Path(path)
    with av.open(str(path), "w", format="mp4") as out:
        st = out.add_stream("aac", rate=sample_rate, layout=LAYOUTS[audio.shape[0]])
        _encode_audio(out, st, audio, sample_rate, planar=True)
    return path


def write_corrupt(path: str | Path, source: str | Path | None = None) -> Path:
    """A broken file: the first third of ``source`` (a truncated MP4), or random bytes without one."""
    path = Path(path)
    if source is not None:
        data = Path(source).read_bytes()
        path.write_bytes(data[: len(data) // 3])
    else:
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path

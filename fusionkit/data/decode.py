"""Decoding real media with PyAV (any container and codec its bundled FFmpeg reads).

Time convention: every time here is in seconds **relative to the media's origin**, which is the
start of the video stream when the file has one, else the start of the audio stream (0 for a
side WAV, whose time 0 is the video's time 0). Frame ``k`` of a video is the frame shown at
``k / fps`` (``fps`` = the stream's average rate); a variable-frame-rate file is mapped onto that
grid (nearest frame number), a gap repeats the previous frame.

* :func:`probe` reads the header: frame rate, frame count, duration, audio rate and channels.
* :func:`read_frames` seeks to the keyframe before the first wanted frame and decodes up to the
  last one, converting only the wanted frames to RGB ``(T, H, W, 3)`` uint8.
* :func:`read_audio` decodes the audio overlapping ``[t0, t1)`` (plus a margin, so the resampling
  filter and the AAC overlap have context), downmixes to mono by averaging the channels, resamples
  to the target rate with ``torchaudio.functional.resample`` and returns exactly
  ``round((t1 - t0) · rate)`` samples; parts of the window outside the recorded audio are zeros.

Failures (unreadable, corrupt, truncated, no video stream, empty span) raise
:class:`DecodeError`; a file without an audio stream makes :func:`read_audio` return ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusionkit.errors import FusionkitError

AUDIO_MARGIN = 0.25  # seconds decoded on each side of an audio window (resampler / AAC context)


class DecodeError(FusionkitError, RuntimeError):
    """A media file that cannot be decoded (corrupt, truncated, unreadable, missing a stream)."""


@dataclass(frozen=True)
class MediaInfo:
    """What :func:`probe` learns from a file's header."""

    path: str
    has_video: bool
    fps: float  # 0 without video
    num_frames: int  # frames of the whole video (0 without video)
    duration: float  # seconds
    width: int
    height: int
    has_audio: bool
    sample_rate: int  # 0 without audio
    channels: int  # 0 without audio
    origin: float  # absolute time (s) of the video (else audio) stream start


def _open(path: str | Path):
    import av

    try:
        return av.open(str(path), metadata_errors="ignore")
    except (OSError, av.FFmpegError, ValueError, UnicodeDecodeError) as err:  # FileNotFoundError is an OSError
        raise DecodeError(f"cannot open {path}: {type(err).__name__}: {err}") from err


def _seconds(value, time_base) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def probe(path: str | Path) -> MediaInfo:
    """Header information of ``path``; :class:`DecodeError` when it cannot be opened."""
    with _open(path) as container:
        return _probe(container, str(path))


def _probe(container, path: str) -> MediaInfo:
    video = container.streams.video[0] if container.streams.video else None
    audio = container.streams.audio[0] if container.streams.audio else None
    if video is None and audio is None:
        raise DecodeError(f"{path} has neither a video nor an audio stream")
    c_duration = container.duration / 1e6 if container.duration else None
    fps = num = width = height = 0
    duration = None
    if video is not None:
        rate = video.average_rate or video.guessed_rate or video.base_rate
        if not rate:
            raise DecodeError(f"{path}: the video stream has no frame rate")
        fps = float(rate)
        duration = _seconds(video.duration, video.time_base) or c_duration
        num = int(video.frames or 0)
        if num <= 0:
            if not duration:
                raise DecodeError(f"{path}: the video stream gives neither a frame count nor a duration")
            num = int(round(duration * fps))
        if not duration:
            duration = num / fps
        width, height = video.codec_context.width, video.codec_context.height
        origin = _seconds(video.start_time, video.time_base) or 0.0
    else:
        duration = _seconds(audio.duration, audio.time_base) or c_duration or 0.0
        origin = _seconds(audio.start_time, audio.time_base) or 0.0
    rate = channels = 0
    if audio is not None:
        rate = int(audio.codec_context.sample_rate or audio.rate or 0)
        channels = int(audio.codec_context.channels or 0)
    return MediaInfo(path, video is not None, fps, num, float(duration or 0.0), int(width or 0), int(height or 0),
                     audio is not None and rate > 0, rate, channels, origin)


def read_frames(path: str | Path, numbers: Sequence[int], info: MediaInfo | None = None,
                convert: Callable[[Any], np.ndarray] | None = None,
                codec_options: Mapping[str, str] | None = None) -> np.ndarray:
    """Frames ``numbers`` (frame ``k`` shown at ``k / fps``) as RGB uint8 ``(len(numbers), H, W, 3)``.

    Numbers past the last decodable frame repeat the last one decoded (a header that over-counts by
    up to ``max(2, 2 %)`` frames); :class:`DecodeError` when the stream is corrupt, ends earlier than
    that (truncated) or gives no frame at all. ``convert(frame) -> array`` replaces the RGB conversion
    and ``codec_options`` are set on the decoder first (the motion-vector modality uses both).
    """
    import av

    if len(numbers) == 0:
        raise ValueError("read_frames: no frame numbers")
    convert_frame = convert or _RGB()
    wanted = sorted(set(int(n) for n in numbers))
    try:
        with _open(path) as container:
            info = info or _probe(container, str(path))
            if not container.streams.video:
                raise DecodeError(f"{path} has no video stream")
            stream = container.streams.video[0]
            if codec_options:
                stream.codec_context.options = dict(codec_options)
            tb = stream.time_base
            fps = info.fps
            start = _seconds(stream.start_time, tb) or 0.0
            if wanted[0] > 0 and tb is not None:
                target = start + (wanted[0] - 0.5) / fps
                container.seek(max(int(math.floor(target / tb)), stream.start_time or 0), stream=stream,
                               backward=True, any_frame=False)
            got: dict[int, np.ndarray] = {}
            prev = None  # the last decoded frame (av.VideoFrame), converted only when needed
            p = 0
            counter = -1
            for frame in container.decode(stream):
                counter += 1
                t = frame.time
                n = int(round((t - start) * fps)) if t is not None else counter
                while p < len(wanted) and wanted[p] < n:  # a gap: repeat the frame before it
                    got[wanted[p]] = convert_frame(prev if prev is not None else frame)
                    p += 1
                if p < len(wanted) and wanted[p] == n:
                    got[wanted[p]] = convert_frame(frame)
                    p += 1
                prev = frame
                if p == len(wanted):
                    break
            if prev is None:
                raise DecodeError(f"{path}: no video frame could be decoded at or after frame {wanted[0]}")
            if p < len(wanted):
                last_n = int(round((prev.time - start) * fps)) if prev.time is not None else counter
                tolerance = max(2, int(round(0.02 * info.num_frames)))
                if wanted[-1] - last_n > tolerance:
                    raise DecodeError(f"{path}: truncated: frame {wanted[-1]} wanted, the stream ends at frame "
                                      f"{last_n} of the {info.num_frames} its header announces")
            last = None
            while p < len(wanted):
                last = last if last is not None else convert_frame(prev)
                got[wanted[p]] = last
                p += 1
    except DecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError, MemoryError) as err:
        raise DecodeError(f"{path}: video decoding failed: {type(err).__name__}: {err}") from err
    return np.stack([got[int(n)] for n in numbers])


class _RGB:
    """``frame -> (H, W, 3) uint8 RGB`` through one reformatter for all frames of a read: its scaler
    context is made once, not once per frame (``frame.to_ndarray(format=...)``), which cost 5× the
    decoding of a small clip. Same pixels."""

    def __init__(self) -> None:
        from av.video.reformatter import VideoReformatter

        self.reformatter = VideoReformatter()

    def __call__(self, frame) -> np.ndarray:
        return self.reformatter.reformat(frame, format="rgb24").to_ndarray()


def read_audio(path: str | Path, t0: float, t1: float, sample_rate: int = 16000,
               origin: float | None = None) -> torch.Tensor | None:
    """Mono float32 audio of ``[t0, t1)`` (seconds after ``origin``) at ``sample_rate``; None without an audio stream.

    ``origin`` is the absolute time of time 0 (default: this file's own origin, see the module
    docstring); pass the video's origin to cut the audio of the same container on the video's clock.
    Exactly ``round((t1 - t0) · sample_rate)`` samples; zeros where the file has no audio.
    """
    import av
    import torchaudio.functional as AF

    if t1 < t0:
        raise ValueError(f"read_audio: t1 ({t1}) < t0 ({t0})")
    out_len = int(round((t1 - t0) * sample_rate))
    try:
        with _open(path) as container:
            if not container.streams.audio:
                return None
            if origin is None:
                origin = _probe(container, str(path)).origin
            stream = container.streams.audio[0]
            rate = int(stream.codec_context.sample_rate or stream.rate or 0)
            if rate <= 0:
                raise DecodeError(f"{path}: the audio stream has no sample rate")
            margin = int(math.ceil(AUDIO_MARGIN * rate))
            a0 = origin + t0  # absolute time of the window start
            first = int(round(a0 * rate)) - margin  # absolute sample index of buffer[0]
            n_native = int(round((t1 - t0) * rate)) + 2 * margin + 1
            buf = np.zeros(n_native, dtype=np.float32)
            tb = stream.time_base
            if tb is not None and a0 - AUDIO_MARGIN > (_seconds(stream.start_time, tb) or 0.0):
                container.seek(int(math.floor((a0 - 2 * AUDIO_MARGIN) / tb)), stream=stream, backward=True)
            to_planar = av.AudioResampler(format="fltp")  # format conversion only: no delay, no rate change
            pos = None  # absolute sample index of the next decoded sample
            for frame in container.decode(stream):
                if frame.pts is not None and frame.time_base is not None:
                    pos = int(round(float(frame.pts * frame.time_base) * rate))
                elif pos is None:
                    pos = 0
                if frame.sample_rate and frame.sample_rate != rate:
                    raise DecodeError(f"{path}: audio changes sample rate mid-stream ({rate} -> {frame.sample_rate})")
                chunks = [f.to_ndarray() for f in to_planar.resample(frame)]
                if not chunks:
                    continue
                mono = np.concatenate(chunks, axis=1).astype(np.float32).mean(axis=0)
                lo, hi = pos - first, pos - first + mono.shape[0]
                a, b = max(lo, 0), min(hi, n_native)
                if a < b:
                    buf[a:b] = mono[a - lo:b - lo]
                pos += mono.shape[0]
                if lo >= n_native:
                    break
    except DecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError, MemoryError) as err:
        raise DecodeError(f"{path}: audio decoding failed: {type(err).__name__}: {err}") from err
    wave = torch.from_numpy(buf)
    if rate != sample_rate:
        wave = AF.resample(wave[None], rate, sample_rate)[0]
    # buffer[0] sits at absolute sample `first` (native); the window starts `margin` native samples later
    offset = int(round((int(round(a0 * rate)) - first) * sample_rate / rate))
    out = wave[offset:offset + out_len]
    if out.shape[0] < out_len:
        out = torch.cat([out, out.new_zeros(out_len - out.shape[0])])
    return out.float().contiguous()

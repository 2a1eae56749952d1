"""Writing real media files with PyAV: H.264 (or MPEG-4 Part 2) video plus optional AAC audio.

Used by the generated data sets (:mod:`fusionkit.data.binding`) and by the data tests
(``tests/media.py``). Video frames are RGB uint8 ``(T, H, W, 3)``, converted to yuv420p by FFmpeg
(so colours are subsampled 2×2 in chroma); audio is float ``(C, n)`` in [-1, 1], ``C`` a key of
:data:`LAYOUTS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def write_video(path: str | Path, frames: np.ndarray, fps: int = 25, audio: np.ndarray | None = None,
                sample_rate: int = 44100, gop: int = 12, codec: str = "libx264",
                options: Mapping[str, str] | None = None, audio_options: Mapping[str, str] | None = None) -> Path:
    """H.264 (yuv420p, crf 2, 2 B-frames, a keyframe every ``gop`` frames) of ``frames`` ``(T, H, W, 3)``
    plus optional AAC ``audio`` ``(C, n)`` at ``sample_rate``; ``codec="mpeg4"`` writes MPEG-4 Part 2
    instead (container from the suffix: .mp4, .mkv, .avi). ``options`` override the video encoder's
    options (e.g. ``{"crf": "1", "bf": "0", "threads": "1"}``), ``audio_options`` set the AAC
    encoder's (e.g. ``{"aac_coder": "fast"}``)."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as out:
        vs = out.add_stream(codec, rate=fps)
        vs.width, vs.height = frames.shape[2], frames.shape[1]
        vs.pix_fmt = "yuv420p"
        if codec == "libx264":
            vs.options = {"crf": "2", "g": str(gop), "preset": "veryfast", "bf": "2", **(options or {})}
        else:
            vs.options = {"qmin": "1", "qmax": "2", "g": str(gop), **(options or {})}
            vs.bit_rate = 4_000_000
        aus = None
        if audio is not None:
            aus = out.add_stream("aac", rate=sample_rate, layout=LAYOUTS[audio.shape[0]])
            aus.options = dict(audio_options or {})
        for img in frames:
            for packet in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        if aus is not None:
            encode_audio(out, aus, audio, sample_rate, planar=True)
    return path


def encode_audio(out, stream, audio: np.ndarray, rate: int, planar: bool, chunk: int = 1024) -> None:
    """Encode ``audio`` ``(C, n)`` float into ``stream`` of the open container ``out`` and flush it:
    float planar frames (``planar``, for AAC) or interleaved 16-bit PCM (WAV), ``chunk`` samples each."""
    import av

    layout = LAYOUTS[audio.shape[0]]
    for pos in range(0, audio.shape[1], chunk):
        block = audio[:, pos:pos + chunk]
        if planar:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block, dtype=np.float32), format="fltp",
                                               layout=layout)
        else:
            pcm = np.clip(np.round(block.T * 32767), -32768, 32767).astype(np.int16).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout=layout)
        frame.sample_rate = rate
        frame.pts = pos
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)

"""I-frames and residuals: the compressed-domain streams of MM-ViT besides the motion vectors.

The MM-ViT paper reads "I-frames (intra-coded frames)", motion vectors and residuals, where "a residual
retains the RGB pixel difference between a P-frame and its reference I-frame after motion
compensation based on motion vectors". Both are rebuilt here from what FFmpeg's decoder gives
(decoded frames and the ``+export_mvs`` side data of :mod:`fusionkit.data.motion`); FFmpeg exports
neither a codec's own residual nor its prediction.

**I-frames** (:func:`keyframes`): the GOP of frame ``k`` starts at the last keyframe (a packet
flagged as a random-access point: IDR in H.264, an I-VOP in MPEG-4 Part 2) shown at or before
``k``; the ``iframe`` modality is that keyframe, decoded by :func:`~fusionkit.data.decode.read_frames`
like any frame, so it takes the video's code path (transforms, normalisation) unchanged. An I-frame
that does not start a GOP (x264 puts one at a scene cut closer than ``keyint_min`` to the last IDR)
is not a keyframe: the frames after it keep the GOP's first keyframe.

**Residuals** (:func:`decode_residual`): for frame ``k`` with motion field ``(dx, dy)``
(:func:`~fusionkit.data.motion.rasterise`: one vector per block, past references only)::

    prediction[y, x] = frame[k - 1][clip(y - round(dy)), clip(x - round(dx))]
    residual = frame[k] - prediction                    (RGB, float32, in pixel levels, [-255, 255])

Blocks without a past vector (intra blocks, blocks predicted from the future only) are predicted
with zero motion, i.e. copied from frame ``k - 1``. Frame 0 and I pictures (``pict_type`` I, whether
they start a GOP or not) have no motion-compensated prediction: their residual is **zero**, as their
motion field is. Source pixels outside the frame are clamped to its edge (H.264's unrestricted
motion vectors extend the reference in the same way).

How this differs from the residual the codec decodes:

* **reference**: always the previous frame in display order. That *is* the reference of every
  P-frame when the stream has no B-frames and one reference frame (libx264 ``bf=0 refs=1``; the
  MPEG-4 Part 2 files of the paper, "I-frames and P-frames", "an I-frame is followed by 11
  P-frames"). With B-frames or several references the exported vectors span a longer gap (see
  :mod:`fusionkit.data.motion`) and the prediction is wrong where there is motion. The paper's
  "reference I-frame" would accumulate the vectors back to the GOP's I-frame (CoViAR's
  accumulated residual); this is the codec's own one-step reference instead.
* **no sub-pixel interpolation**: vectors are rounded to whole pixels (halves to even), where
  H.264 interpolates quarter-pel luma (6-tap filter) and eighth-pel chroma, MPEG-4 half-pel.
* **no bi-prediction, no weighted prediction**: one past vector per block, weight 1, no offset.
* **intra blocks** of a P-frame are predicted from the previous frame (zero motion), not from
  their spatial neighbours as the codec's intra prediction does.
* **colour**: the difference of RGB frames (the paper's "RGB pixel difference"), not of the
  codec's YUV 4:2:0 planes: chroma is upsampled and converted before subtracting.
* **deblocking**: the reference is the decoded, in-loop deblocked frame, as the codec's is; but
  the codec's residual is its dequantised transform output (the current frame *before* its
  deblocking filter minus the prediction), where this one subtracts from the deblocked output.

For a static scene, or content moving rigidly by whole pixels, the residual is near zero except
where new content enters; ``tests/test_compressed_streams.py`` checks it against the plain frame
difference on a panning texture.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fusionkit.data.decode import DecodeError, MediaInfo, _open, _RGB, read_frames
from fusionkit.data.motion import _vectors, rasterise


def keyframes(path: str | Path, numbers: Sequence[int], info: MediaInfo | None = None) -> list[int]:
    """For each frame of ``numbers``, the number of the keyframe that starts its GOP (see the module docstring).

    Reads packets only (no decoding): from the keyframe before the first wanted frame up to the
    first packet shown after the last one. :class:`DecodeError` when the file cannot be read or no
    keyframe precedes a wanted frame.
    """
    import av

    wanted = sorted({int(n) for n in numbers})
    starts: list[int] = []
    try:
        with _open(path) as container:
            if not container.streams.video:
                raise DecodeError(f"{path} has no video stream")
            stream = container.streams.video[0]
            tb = stream.time_base
            fps = info.fps if info is not None else float(stream.average_rate or stream.guessed_rate)
            origin = float(stream.start_time * tb) if stream.start_time is not None else 0.0
            if wanted[0] > 0:
                target = int(math.floor((origin + (wanted[0] - 0.5) / fps) / tb))
                container.seek(max(target, stream.start_time or 0), stream=stream, backward=True, any_frame=False)
            for packet in container.demux(stream):
                if packet.pts is None:  # the demuxer's final empty packet
                    continue
                n = int(round((float(packet.pts * tb) - origin) * fps))
                if packet.is_keyframe and (not starts or n > starts[-1]):
                    starts.append(n)
                if n > wanted[-1]:  # closed GOPs: every keyframe shown before it has been read
                    break
    except DecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError) as err:
        raise DecodeError(f"{path}: reading packets failed: {type(err).__name__}: {err}") from err
    if not starts or starts[0] > wanted[0]:
        raise DecodeError(f"{path}: no keyframe at or before frame {wanted[0]}")
    return [starts[bisect.bisect_right(starts, int(n)) - 1] for n in numbers]


def compensate(reference: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Motion-compensated prediction ``(H, W, C)`` of ``reference`` ``(H, W, C)`` shifted by ``field``
    ``(2, H, W)`` (``dx, dy``: position here minus position in the reference; rounded, edges clamped)."""
    h, w = field.shape[1:]
    ys = np.clip(np.arange(h)[:, None] - np.rint(field[1]).astype(np.int64), 0, h - 1)
    xs = np.clip(np.arange(w)[None, :] - np.rint(field[0]).astype(np.int64), 0, w - 1)
    return reference[ys, xs]


class _Planes:
    """``frame -> (H, W, 6)`` float32: RGB (pixel levels), the motion field ``dx, dy`` and an I-picture flag."""

    def __init__(self) -> None:
        self.rgb = _RGB()

    def __call__(self, frame) -> np.ndarray:
        import av

        rgb = self.rgb(frame).astype(np.float32)
        field = rasterise(_vectors(frame), frame.height, frame.width).transpose(1, 2, 0)
        intra = np.full((frame.height, frame.width, 1), float(frame.pict_type == av.video.frame.PictureType.I),
                        dtype=np.float32)
        return np.concatenate([rgb, field, intra], axis=-1)


def _residual(planes: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """Residual ``(H, W, 3)`` of one frame's ``(H, W, 6)`` planes against the previous frame's (``None``: frame 0)."""
    rgb = planes[..., :3]
    if reference is None or planes[0, 0, 5] > 0:
        return np.zeros_like(rgb)
    return rgb - compensate(reference[..., :3], planes[..., 3:5].transpose(2, 0, 1))


def decode_residual(path: str | Path, numbers: Sequence[int], info: MediaInfo | None = None) -> np.ndarray:
    """Residuals of frames ``numbers`` as float32 ``(3, T, H, W)`` in RGB pixel levels (module docstring).

    One pass of :func:`~fusionkit.data.decode.read_frames` (its seeking, end padding and
    :class:`DecodeError`) over the wanted frames and the frames before them, with motion vectors.
    """
    wanted = {int(n) for n in numbers}
    union = sorted(wanted | {n - 1 for n in wanted if n > 0})
    planes = read_frames(path, union, info, convert=_Planes(), codec_options={"flags2": "+export_mvs"})
    row = {n: i for i, n in enumerate(union)}
    out = np.stack([_residual(planes[row[n]], planes[row[n - 1]] if n > 0 else None) for n in map(int, numbers)])
    return np.ascontiguousarray(out.transpose(3, 0, 1, 2))  # (T, H, W, 3) -> (3, T, H, W)


def normalize_residual(residual: Tensor, std: Sequence[float]) -> Tensor:
    """``(T, 3, H, W)`` pixel-level residuals to float32 ``(3, T, H, W)`` on the video's scale.

    ``residual / 255 / std`` per channel: the difference of the normalised frame and the normalised
    prediction (the mean cancels), so a residual is in the units of the ``video`` / ``iframe`` inputs.
    """
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (residual.float() / 255.0 / s).permute(1, 0, 2, 3).contiguous()

"""Motion vectors: the H.264 / MPEG-4 motion vectors FFmpeg exports, rasterised to a dense field.

The ``motion`` modality of :class:`~fusionkit.data.dataset.ManifestDataset` (MM-ViT's compressed
domain inputs). For every sampled frame, FFmpeg's ``+export_mvs`` side data (one vector per
prediction block) is drawn into a float32 ``(2, H, W)`` field at the stream's resolution:

* **convention**: channel 0 is ``dx``, channel 1 is ``dy``, in pixels, the displacement of the
  block's content *from its position in the reference frame to its position in this frame*
  (``dst − src = −motion_{x,y} / motion_scale``). With one previous frame as reference (a P-frame
  without B-frames) an object moving right by 4 px per frame gives ``dx = +4``. FFmpeg does not
  say how many frames away the reference is (only past / future), so with B-frames or
  multi-frame references a P-frame's vectors span the whole reference distance (e.g. ``+12`` for
  a P-frame three frames after its reference); they are not divided by it.
* **direction**: only vectors predicted from the past (``source < 0``) are used; blocks predicted
  from the future only (B-frames) and intra blocks are 0. Where past vectors overlap (they should
  not in H.264) they are averaged.
* **blocks**: a vector fills its ``w × h`` destination block (``dst_x, dst_y`` is the block's
  centre), clipped to the frame; pixels without a vector are 0. Keyframes / I-frames: all zeros.

Frame numbering, seeking and padding of frames past the end follow
:func:`fusionkit.data.decode.read_frames`, so ``decode_motion(path, numbers)`` is aligned with
``read_frames(path, numbers)``. :func:`geometric` passes a field through the same spatial
transform as the video (crop / resize / flip) and rescales the vectors into output pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fusionkit.data.decode import MediaInfo, read_frames


def rasterise(vectors: np.ndarray | None, height: int, width: int) -> np.ndarray:
    """FFmpeg ``MOTION_VECTORS`` (a structured array, or ``None``) to a float32 ``(2, H, W)`` field."""
    out = np.zeros((2, height, width), dtype=np.float32)
    if vectors is None or len(vectors) == 0:
        return out
    mv = vectors[vectors["source"] < 0]
    if len(mv) == 0:
        return out
    scale = np.maximum(mv["motion_scale"].astype(np.float32), 1.0)
    dx = -mv["motion_x"].astype(np.float32) / scale
    dy = -mv["motion_y"].astype(np.float32) / scale
    total = np.zeros((2, height * width), dtype=np.float32)
    count = np.zeros(height * width, dtype=np.float32)
    w_all, h_all = mv["w"].astype(np.int64), mv["h"].astype(np.int64)
    x0_all = mv["dst_x"].astype(np.int64) - w_all // 2
    y0_all = mv["dst_y"].astype(np.int64) - h_all // 2
    for bw, bh in set(zip(w_all.tolist(), h_all.tolist())):  # one vectorised pass per block size
        sel = (w_all == bw) & (h_all == bh)
        ys = y0_all[sel][:, None, None] + np.arange(bh)[None, :, None]
        xs = x0_all[sel][:, None, None] + np.arange(bw)[None, None, :]
        ys, xs = np.broadcast_arrays(ys, xs)
        inside = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
        flat = (ys * width + xs)[inside]
        n = np.broadcast_to(np.arange(int(sel.sum()))[:, None, None], ys.shape)[inside]
        np.add.at(total[0], flat, dx[sel][n])
        np.add.at(total[1], flat, dy[sel][n])
        np.add.at(count, flat, 1.0)
    hit = count > 0
    total[:, hit] /= count[hit]
    return total.reshape(2, height, width)


def decode_motion(path: str | Path, indices: Sequence[int], info: MediaInfo | None = None) -> np.ndarray:
    """Motion fields of frames ``indices`` (frame ``k`` shown at ``k / fps``) as float32 ``(2, T, H, W)``.

    See the module docstring for the convention. The frame walk (seeking, gaps, end padding, the
    truncation rules and :class:`~fusionkit.data.decode.DecodeError`) is :func:`read_frames`' own,
    with FFmpeg's motion-vector export switched on and each frame rasterised instead of converted.
    """
    fields = read_frames(path, indices, info, convert=lambda frame: rasterise(_vectors(frame), frame.height, frame.width),
                         codec_options={"flags2": "+export_mvs"})
    return np.ascontiguousarray(fields.transpose(1, 0, 2, 3))  # (T, 2, H, W) -> (2, T, H, W)


def _vectors(frame) -> np.ndarray | None:
    side = frame.side_data.get("MOTION_VECTORS")
    return None if side is None else side.to_ndarray()


def geometric(motion: Tensor, transform: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply the video's spatial ``transform`` to a ``(2, T, H, W)`` field and rescale its vectors.

    ``transform`` maps a float ``(T', 2, H, W)`` tensor to ``(T', 2, h, w)`` with a crop, resize
    and / or horizontal flip (the same parameters as the video's). A coordinate frame (x and y
    pixel ramps) travels with the field, so the vectors are scaled by the output / input pixel
    ratio along each axis and ``dx`` changes sign under a flip. Returns float32 ``(2, T, h, w)``.
    """
    c, t, h, w = motion.shape
    if c != 2:
        raise ValueError(f"expected a motion field (2, T, H, W), got {tuple(motion.shape)}")
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    x = torch.cat([motion.float().permute(1, 0, 2, 3), torch.stack([xs, ys])[None]])  # (T + 1, 2, H, W)
    y = transform(x)
    field, coords = y[:t], y[t]
    slope_x = coords[0].diff(dim=1).median() if coords.shape[-1] > 1 else torch.tensor(1.0)
    slope_y = coords[1].diff(dim=0).median() if coords.shape[-2] > 1 else torch.tensor(1.0)
    # an output pixel step covers `slope` input pixels: a displacement of d input pixels is d / slope output pixels
    sx = 1.0 / slope_x if slope_x.abs() > 1e-6 else torch.tensor(0.0)
    sy = 1.0 / slope_y if slope_y.abs() > 1e-6 else torch.tensor(0.0)
    out = torch.stack([field[:, 0] * sx, field[:, 1] * sy])
    return out.float().contiguous()

"""Video transforms: train-time augmentation and test-time crops, on uint8 ``(T, 3, H, W)`` clips.

Every random parameter is drawn once per clip (``torchvision.transforms.v2`` on a
``tv_tensors.Video``), so all frames of a clip get the same crop, flip, jitter and RandAugment ops.

* :class:`TrainTransform`: ``RandomResizedCrop(size, scale, ratio)`` → horizontal flip (optional)
  → ``ColorJitter(b, c, s, h)`` (optional) → ``RandAugment(n, m)`` (optional) → float, normalise.
* :func:`view_crop`: resize the short side to ``short_side`` (antialiased bilinear), then a square
  ``size`` crop at a position along the long side (0 = left/top, 0.5 = centre, 1 = right/bottom).
* :func:`normalize`: uint8 → float32 in [0, 1] → ``(x - mean) / std``, returned as ``(3, T, H, W)``.

Normalisation constants (:data:`NORMS`): ``"imagenet"`` (the default: VideoMAE, timm ViTs and CNNs,
MM-ViT) and ``"clip"`` (OpenAI CLIP's own statistics).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

NORMS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


def norm_constants(mean: str | Sequence[float] | None = "imagenet",
                   std: Sequence[float] | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` from a name in :data:`NORMS` or explicit three-element lists."""
    if mean is None:
        mean = "imagenet"
    if isinstance(mean, str):
        if mean not in NORMS:
            raise ValueError(f"unknown normalisation {mean!r}; choose one of {sorted(NORMS)} or give lists")
        m, s = NORMS[mean]
        if std is not None:
            if isinstance(std, str):
                if std not in NORMS:
                    raise ValueError(f"unknown normalisation {std!r}; choose one of {sorted(NORMS)}")
                s = NORMS[std][1]
            else:
                s = tuple(float(v) for v in std)
        return m, s
    if isinstance(std, str):
        std = NORMS[std][1] if std in NORMS else None
    if std is None:
        raise ValueError("give std together with an explicit mean")
    m, s = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(m) != 3 or len(s) != 3 or min(s) <= 0:
        raise ValueError(f"mean and std need three values each (std > 0), got {m}, {s}")
    return m, s


def to_video(frames) -> Tensor:
    """RGB uint8 ``(T, H, W, 3)`` (numpy or tensor) to a contiguous uint8 tensor ``(T, 3, H, W)``."""
    x = torch.as_tensor(frames)
    if x.dim() != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).contiguous()


def normalize(video: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``(T, 3, H, W)`` to normalised float32 ``(3, T, H, W)``."""
    x = video.float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).permute(1, 0, 2, 3).contiguous()


def resize_short_side(video: Tensor, short_side: int) -> Tensor:
    """Resize uint8 ``(T, 3, H, W)`` so ``min(H, W) == short_side`` (aspect kept, antialiased bilinear)."""
    import torchvision.transforms.v2.functional as F

    h, w = video.shape[-2:]
    if min(h, w) == short_side:
        return video
    if h <= w:
        size = [short_side, max(short_side, int(round(w * short_side / h)))]
    else:
        size = [max(short_side, int(round(h * short_side / w))), short_side]
    return F.resize(video, size, antialias=True)


def view_crop(video: Tensor, size: int, position: float = 0.5, short_side: int | None = None) -> Tensor:
    """Short side to ``short_side`` (default ``size``), then a ``size``×``size`` crop at ``position``."""
    video = resize_short_side(video, short_side or size)
    h, w = video.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from {h}x{w}; short_side must be >= size")
    top = int(round((h - size) * (position if h > w else 0.5)))
    left = int(round((w - size) * (position if w >= h else 0.5)))
    return video[..., top:top + size, left:left + size]


class TrainTransform:
    """Clip-consistent train augmentation on uint8 ``(T, 3, H, W)``; returns uint8 ``(T, 3, size, size)``.

    Args:
        size: output side.
        scale, ratio: ``RandomResizedCrop`` area fraction and aspect-ratio ranges; ``scale=None``
            replaces it by a short-side resize to ``size`` and a random square crop.
        flip: random horizontal flip (p = 0.5); turn off for direction-sensitive labels (SSV2).
        color_jitter: ``float`` (brightness = contrast = saturation = value, hue 0), a list
            ``[b, c, s]`` / ``[b, c, s, h]``, or ``None`` / 0 for none.
        randaugment: ``{n, m}`` (ops per clip, magnitude of 31 bins) or ``None``.
    """

    def __init__(self, size: int = 224, scale: Sequence[float] | None = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True,
                 color_jitter: float | Sequence[float] | None = None, randaugment: dict | None = None) -> None:
        import torchvision.transforms.v2 as T

        if scale is None:  # no random resized crop: short side to size, then a random square crop
            ops: list = [T.Resize(size, antialias=True), T.RandomCrop(size)]
        else:
            ops = [T.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), antialias=True)]
        if flip:
            ops.append(T.RandomHorizontalFlip())
        if color_jitter:
            cj = [float(color_jitter)] * 3 if isinstance(color_jitter, (int, float)) else [float(v) for v in color_jitter]
            if len(cj) not in (3, 4):
                raise ValueError(f"color_jitter must be a number or [b, c, s] / [b, c, s, h], got {color_jitter}")
            ops.append(T.ColorJitter(*cj))
        if randaugment:
            unknown = set(randaugment) - {"n", "m"}
            if unknown:
                raise ValueError(f"randaugment takes keys n and m, got {sorted(unknown)}")
            ops.append(T.RandAugment(num_ops=int(randaugment.get("n", 2)), magnitude=int(randaugment.get("m", 9))))
        self.transform = T.Compose(ops)
        n_geo = (1 if scale is not None else 2) + int(bool(flip))
        self.geometric = T.Compose(ops[:n_geo])  # crop / resize / flip: also applied to a motion field
        self.photometric = T.Compose(ops[n_geo:]) if ops[n_geo:] else None  # colour jitter, RandAugment: video only

    def __call__(self, video: Tensor) -> Tensor:
        from torchvision import tv_tensors

        out = self.transform(tv_tensors.Video(video))
        return out.as_subclass(Tensor)

    def paired(self, video: Tensor, field: Tensor) -> tuple[Tensor, Tensor]:
        """``video`` (uint8 ``(T, 3, H, W)``) as :meth:`__call__`, and float ``field`` ``(T', C, H, W)``
        through the same crop / resize / flip (the same draw) but not the colour ops (RandAugment's
        rotate / shear / translate too move the video alone)."""
        from torchvision import tv_tensors

        v, f = self.geometric(tv_tensors.Video(video), tv_tensors.Video(field))
        if self.photometric is not None:
            v = self.photometric(v)
        return v.as_subclass(Tensor), f.as_subclass(Tensor)

    def __repr__(self) -> str:
        return f"TrainTransform({self.transform})"

"""``spectrogram_image``: a waveform as images for an image expert (LAVISH, AV-STFP).

LAVISH and AV-STFP push audio through a frozen *image* ViT: the log-mel spectrogram becomes an
image (mel bins as rows, frames as columns) repeated to three channels, which is the same as
summing the patch embedding's weights over RGB. AV-STFP cuts the waveform into ``chunks`` equal
pieces aligned with the video frames (one spectrogram image per chunk); LAVISH uses one image.

Output ``(B, 3, chunks, H, W)``, the video layout a per-frame image expert embeds (``H = mel bins``,
``W = frames`` unless ``size`` resizes it bilinearly to the expert's input size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from fusionkit.frontends.fbank import KaldiFbank
from fusionkit.registry import FRONTENDS


@FRONTENDS.register("spectrogram_image")
class SpectrogramImage(nn.Module):
    """Waveform ``(B, samples)`` → per-chunk normalised fbank images ``(B, 3, chunks, H, W)``.

    Args:
        chunks: equal pieces of the waveform, one image each (AV-STFP: 10, one per video frame).
        frames: fbank frames per image (zero-padded or cropped), e.g. LAVISH ViT: 102.
        size: ``(H, W)`` to resize each image to (e.g. the expert's 224×224), or ``None``.
        channels: channels of the output image (the spectrogram repeated).
        **fbank: options of :class:`~fusionkit.frontends.fbank.KaldiFbank` (``sample_rate``,
            ``num_mel_bins``, ``frame_shift``, ``mean``, ``std``, ...).
    """

    def __init__(self, chunks: int = 1, frames: int | None = None, size: Sequence[int] | None = None,
                 channels: int = 3, **fbank: object) -> None:
        super().__init__()
        if chunks < 1:
            raise ValueError(f"spectrogram_image: chunks must be >= 1, got {chunks}")
        self.chunks = chunks
        self.size = tuple(size) if size is not None else None
        self.channels = channels
        self.fbank = KaldiFbank(target_length=frames, **fbank)

    def forward(self, waveform: Tensor, sample_rate: int | None = None) -> Tensor:
        mono = self.fbank.mono(waveform, sample_rate)  # (B, samples) at the fbank rate
        if mono.shape[-1] < self.chunks:
            raise ValueError(f"spectrogram_image: {mono.shape[-1]} samples cannot be cut into {self.chunks} chunks")
        pieces = torch.tensor_split(mono, self.chunks, dim=-1)
        images = torch.stack([self._image(piece) for piece in pieces], dim=1)
        return repeat(images, "b t h w -> b c t h w", c=self.channels)

    def _image(self, piece: Tensor) -> Tensor:
        """``(B, samples)`` → ``(B, H, W)``: mel bins as rows, frames as columns."""
        feats = self.fbank(piece, sample_rate=self.fbank.fbank_sample_rate)  # already mono at the fbank rate
        image = rearrange(feats, "b frames mel -> b mel frames")
        if self.size is not None:
            image = F.interpolate(image[:, None], size=self.size, mode="bilinear", align_corners=False)[:, 0]
        return image

"""``spectrogram_image``: a waveform as images for an image expert (LAVISH, AV-STFP).

LAVISH and AV-STFP push audio through a frozen *image* ViT: the log-mel spectrogram becomes an
image repeated to three channels, which is the same as summing the patch embedding's weights over
RGB. AV-STFP cuts the waveform into ``chunks`` equal pieces aligned with the video frames (one
spectrogram image per chunk); LAVISH uses one image.

Orientation: ``mel_rows`` (the default) puts the mel bins on the rows and the frames on the
columns; ``time_rows`` puts the frames on the rows and the mel bins on the columns, as the kaldi
fbank comes out ``(frames, mel)`` and as the official LAVISH code feeds it (``AVE/dataloader.py``
returns the ``(target_length, num_mel_bins)`` fbank, which ``net_trans.py`` patch-embeds as is).

Output ``(B, 3, chunks, H, W)``, the video layout a per-frame image expert embeds (``H, W`` = mel
bins, frames for ``mel_rows``; frames, mel bins for ``time_rows``; or ``size`` when it resizes
each image bilinearly to the expert's input size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from fusionkit.frontends.fbank import KaldiFbank
from fusionkit.registry import FRONTENDS

ORIENTATIONS = ("mel_rows", "time_rows")


@FRONTENDS.register("spectrogram_image")
class SpectrogramImage(nn.Module):
    """Waveform ``(B, samples)`` → per-chunk normalised fbank images ``(B, 3, chunks, H, W)``.

    Args:
        chunks: equal pieces of the waveform, one image each (AV-STFP: 10, one per video frame).
        target_length: fbank frames per image (zero-padded or cropped), e.g. LAVISH ViT: 102 (as ``fbank``).
        size: ``(H, W)`` to resize each image to (e.g. the expert's 224×224), or ``None``.
        channels: channels of the output image (the spectrogram repeated).
        orientation: ``mel_rows`` (mel bins as rows, frames as columns) or ``time_rows`` (frames as
            rows, mel bins as columns: the official LAVISH layout).
        **fbank: options of :class:`~fusionkit.frontends.fbank.KaldiFbank` (``sample_rate``,
            ``num_mel_bins``, ``frame_shift``, ``mean``, ``std``, ...).
    """

    def __init__(self, chunks: int = 1, target_length: int | None = None, size: Sequence[int] | None = None,
                 channels: int = 3, orientation: str = "mel_rows", **fbank: object) -> None:
        super().__init__()
        if chunks < 1:
            raise ValueError(f"spectrogram_image: chunks must be >= 1, got {chunks}")
        if orientation not in ORIENTATIONS:
            raise ValueError(f"spectrogram_image: unknown orientation {orientation!r}; "
                             f"valid: {', '.join(ORIENTATIONS)}")
        self.chunks = chunks
        self.size = tuple(size) if size is not None else None
        self.channels = channels
        self.orientation = orientation
        self.fbank = KaldiFbank(target_length=target_length, **fbank)

    def forward(self, waveform: Tensor, sample_rate: int | None = None) -> Tensor:
        mono = self.fbank.mono(waveform, sample_rate)  # (B, samples) at the fbank rate
        if mono.shape[-1] < self.chunks:
            raise ValueError(f"spectrogram_image: {mono.shape[-1]} samples cannot be cut into {self.chunks} chunks")
        pieces = torch.tensor_split(mono, self.chunks, dim=-1)
        images = torch.stack([self._image(piece) for piece in pieces], dim=1)
        return repeat(images, "b t h w -> b c t h w", c=self.channels)

    def _image(self, piece: Tensor) -> Tensor:
        """``(B, samples)`` → ``(B, H, W)``: ``(B, mel, frames)`` or ``(B, frames, mel)`` by orientation."""
        feats = self.fbank(piece, sample_rate=self.fbank.fbank_sample_rate)  # (B, frames, mel), mono at the fbank rate
        image = feats if self.orientation == "time_rows" else rearrange(feats, "b frames mel -> b mel frames")
        if self.size is not None:
            image = F.interpolate(image[:, None], size=self.size, mode="bilinear", align_corners=False)[:, 0]
        return image

    def extra_repr(self) -> str:
        return f"chunks={self.chunks}, orientation={self.orientation}, size={self.size}"

"""``vggish``: one 128-d VGGish vector per time step of a clip, MM-ViT's audio input.

The MM-ViT paper: "we partition the 1D audio waveform to T segments and project each segment to a
128-dimensional vector using a pretrained VGGish model" ("1-second long segments" in its UCF-101
set-up). :class:`VGGish` takes the clip's waveform ``(B, samples)`` and returns ``(B, steps, 128)``:

1. resample to 16 kHz (``torchaudio.functional.resample``) when the input rate differs;
2. **windows**: the waveform is cut into ``steps`` equal segments; step ``i`` reads the VGGish
   example *centred on its segment's centre* ``c_i = (i + 1/2) · n / steps`` (``n`` samples):
   the ``15600`` samples ``[round(c_i) − 7800, round(c_i) + 7800)`` (zeros outside the waveform),
   whose 96 frames of 25 ms every 10 ms span 0.975 s and are centred on ``c_i``. Segments longer
   than that are read in their middle only; shorter ones overlap their neighbours' examples;
3. **log-mel** (VGGish's own features): periodic Hann window of 400 samples, hop 160, magnitude
   of a 512-point FFT, 64 mel bands from 125 to 7500 Hz with triangles linear on the HTK mel scale
   ``1127 · ln(1 + f / 700)`` (the DC bin weighted 0), ``log(mel + 0.01)``: ``(96, 64)`` per step;
4. **network** (VGGish, the AudioSet VGG): 3×3 convolutions with ReLU, widths ``64 | 128 |
   256, 256 | 512, 512`` with a 2×2 max-pool after each group (``(1, 96, 64) → (512, 6, 4)``),
   flattened channels-last (TensorFlow's order), then ``Linear(12288, 4096)``, ReLU,
   ``Linear(4096, 4096)``, ReLU, ``Linear(4096, 128)``, ReLU.

**Alignment with the frames.** The steps' centres are the sampled frames' centres when the clip's
frames are equally spaced ``Δ`` apart and the audio window is ``steps · Δ`` long, centred on them:
with dense sampling (``frames`` frames ``stride`` apart at ``fps``) that is ``audio.seconds = frames ·
stride / fps`` in the dataset (the window is centred on the frames' span), e.g. 8 frames every 25 at
25 fps and ``seconds: 8`` give the paper's one-second segments.

**Weights.** ``checkpoint``: a local file (``.pth`` / ``.safetensors``) in the state-dict layout of
the PyTorch port harritaylor/torchvggish (``vggish-10086976.pth``): ``features.{0,3,6,8,11,13}``
(the convolutions, ``(out, in, 3, 3)`` + ``(out,)``) and ``embeddings.{0,2,4}`` (the linear layers);
``pproc.*`` entries (its PCA post-processor) are ignored: the output is the embedding layer, before
PCA whitening and 8-bit quantisation. Without a checkpoint the weights are random (PyTorch's
default initialisation) drawn from a fixed ``seed``, so that every dataset (train, val, test,
``fusionkit predict``) builds the same extractor; nothing is downloaded. ``widths`` / ``hidden`` shrink the network (tests);
the defaults are VGGish's. The module is frozen (no gradients) by default: a pretrained extractor.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fusionkit.registry import FRONTENDS

SAMPLE_RATE = 16000
WINDOW, HOP, FFT = 400, 160, 512  # 25 ms, 10 ms, the next power of two
MEL_BINS, MEL_LOW, MEL_HIGH = 64, 125.0, 7500.0
EXAMPLE_FRAMES = 96  # 0.96 s of hops
EXAMPLE_SAMPLES = (EXAMPLE_FRAMES - 1) * HOP + WINDOW  # 15600 samples read per example
LOG_OFFSET = 0.01
EMBEDDING = 128


def hz_to_mel(hz: Tensor) -> Tensor:
    """HTK mel scale ``1127 · ln(1 + f / 700)``."""
    return 1127.0 * torch.log1p(hz / 700.0)


@functools.lru_cache(maxsize=4)
def mel_matrix(bins: int = MEL_BINS, spectrum: int = FFT // 2 + 1, rate: int = SAMPLE_RATE,
               low: float = MEL_LOW, high: float = MEL_HIGH) -> Tensor:
    """``(spectrum, bins)`` float32 triangular filters, linear in mel between equally spaced mel edges."""
    bin_mel = hz_to_mel(torch.linspace(0.0, rate / 2, spectrum, dtype=torch.float64))[:, None]
    edges = torch.linspace(float(hz_to_mel(torch.tensor(low))), float(hz_to_mel(torch.tensor(high))), bins + 2,
                           dtype=torch.float64)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    weights = torch.minimum((bin_mel - lower) / (centre - lower), (upper - bin_mel) / (upper - centre)).clamp_min(0)
    weights[0] = 0.0  # the DC bin
    return weights.float()


def log_mel(examples: Tensor) -> Tensor:
    """VGGish log-mel ``(..., 96, 64)`` of 16 kHz waveforms ``(..., 15600)``."""
    frames = examples.unfold(-1, WINDOW, HOP)  # (..., 96, 400)
    window = torch.hann_window(WINDOW, periodic=True, dtype=examples.dtype, device=examples.device)
    magnitude = torch.fft.rfft(frames * window, n=FFT).abs()
    return torch.log(magnitude @ mel_matrix().to(magnitude) + LOG_OFFSET)


def _vgg(widths: Sequence[int]) -> nn.Sequential:
    """Conv stack of ``widths = (w1, w2, w3, w4)``: ``w1 | w2 | w3, w3 | w4, w4``, a 2×2 max-pool after each group."""
    layers: list[nn.Module] = []
    cin = 1
    for group in ([widths[0]], [widths[1]], [widths[2]] * 2, [widths[3]] * 2):
        for cout in group:
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
            cin = cout
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


@FRONTENDS.register("vggish")
class VGGish(nn.Module):
    """Clip waveform ``(B, samples)`` to VGGish vectors ``(B, steps, 128)``, one per time step (module docstring).

    Args:
        sample_rate: rate of the incoming waveforms (resampled to 16 kHz when different).
        steps: ``T``, the time steps (the clip's sampled frames).
        checkpoint: a local torchvggish-layout state-dict file; ``None``: random weights.
        widths: the four convolution widths (VGGish: ``64, 128, 256, 512``).
        hidden: width of the two hidden linear layers (VGGish: 4096).
        frozen: no gradients for the weights (default).
        seed: the random weights' seed without a checkpoint (the global random state is left as it was).
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE, steps: int = 8, checkpoint: str | None = None,
                 widths: Sequence[int] = (64, 128, 256, 512), hidden: int = 4096, frozen: bool = True,
                 seed: int = 0) -> None:
        super().__init__()
        if int(steps) < 1:
            raise ValueError(f"vggish: steps must be >= 1, got {steps!r}")
        if len(widths) != 4:
            raise ValueError(f"vggish: widths takes four convolution widths, got {list(widths)}")
        self.sample_rate, self.steps = int(sample_rate), int(steps)
        grid = (EXAMPLE_FRAMES // 16) * (MEL_BINS // 16)  # 6 × 4 after four 2×2 pools
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.features = _vgg(widths)
            self.embeddings = nn.Sequential(nn.Linear(widths[3] * grid, hidden), nn.ReLU(inplace=True),
                                            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                            nn.Linear(hidden, EMBEDDING), nn.ReLU(inplace=True))
        if checkpoint:
            self.load(checkpoint)
        if frozen:
            self.requires_grad_(False)

    def load(self, path: str) -> None:
        """Load a torchvggish-layout state dict (``pproc.*`` ignored); strict, errors name the keys."""
        from fusionkit.experts.pretrained import load_into, read_state_dict

        load_into(self, read_state_dict(path), str(path), ignore=lambda key: key.startswith("pproc."))

    def windows(self, waveform: Tensor) -> Tensor:
        """The ``(B, steps, 15600)`` 16 kHz samples each step reads, centred on its segment (zeros outside)."""
        n = waveform.shape[-1]
        half = EXAMPLE_SAMPLES // 2
        centres = torch.tensor([round((i + 0.5) * n / self.steps) for i in range(self.steps)], device=waveform.device)
        index = centres[:, None] - half + torch.arange(EXAMPLE_SAMPLES, device=waveform.device)  # (steps, 15600)
        padded = nn.functional.pad(waveform, (half, half))
        return padded[:, index + half]

    def embed(self, examples: Tensor) -> Tensor:
        """Log-mel examples ``(N, 96, 64)`` to ``(N, 128)``."""
        x = self.features(examples[:, None])  # (N, C, 6, 4)
        return self.embeddings(x.permute(0, 2, 3, 1).flatten(1))

    def forward(self, waveform: Tensor, sample_rate: int | None = None) -> Tensor:
        """Mono ``(B, samples)`` at ``sample_rate`` (default the module's) to ``(B, steps, 128)``."""
        if waveform.dim() != 2 or not waveform.is_floating_point():
            raise ValueError(f"vggish expects a float mono waveform (B, samples), got {waveform.dtype} "
                             f"{tuple(waveform.shape)}")
        rate = self.sample_rate if sample_rate is None else int(sample_rate)
        if rate != SAMPLE_RATE:
            import torchaudio.functional as AF

            waveform = AF.resample(waveform, rate, SAMPLE_RATE)
        mel = log_mel(self.windows(waveform.float()))  # (B, steps, 96, 64)
        return self.embed(mel.flatten(0, 1)).unflatten(0, mel.shape[:2])

    def extra_repr(self) -> str:
        return f"sample_rate={self.sample_rate}, steps={self.steps}"

"""Test-time corruptions of decoded clips: ``fusionkit eval RECIPE --checkpoint C --corrupt SPEC ...``.

The audio corruptions follow the robustness protocol of the CA²ST paper (Lee, Chang, Lee, Choi;
Table XXII, CAVA on EPIC-SOUNDS): "(i) Misalignment (random audio shift of -2 to +2 seconds),
(ii) Dropout (20% random audio removal), (iii) Gaussian noise, and (iv) Pink noise (natural
background noise)". The paper gives no SNR; the video corruptions are fusionkit's own.

A SPEC is ``NAME``, ``NAME:VALUE`` (the first parameter) or ``NAME:KEY=VALUE[,KEY=VALUE ...]``
(the first parameter's value may also stand bare in front: ``audio_drop:0.2,segment=0.05``). Every
corruption also takes ``seed`` (an integer, default 0). Defaults in brackets:

* ``audio_shift:seconds[=2],fixed[=0]``: the audio window is moved by ``u`` seconds, ``u`` uniform in
  ``[-seconds, +seconds]`` per clip (``fixed=1``: ``u = seconds``, which may be negative); the dataset
  reads the moved window from the file (zeros where the file has no audio).
* ``audio_drop:fraction[=0.2],segment[=0]``: exactly ``round(fraction · n)`` of the ``n`` samples
  zeroed, picked at random; with ``segment=S`` (seconds) in gaps of ``round(S · rate)`` samples (the
  last one cut short so that the count stays exact).
* ``gaussian_noise:snr[=10]``, ``pink_noise:snr[=10]``: white Gaussian or pink (1/f power) noise,
  scaled so that the clip's ``10 log10(mean(x²) / mean(noise²))`` is exactly ``snr`` dB; a silent
  clip stays silent.
* ``frame_drop:fraction[=0.25]``: ``min(round(fraction · T), T - 1)`` random frames after the first
  replaced by the last kept frame before each.
* ``blur:sigma[=1.5]``: Gaussian blur of ``sigma`` pixels (kernel side ``2 ceil(3 sigma) + 1``,
  reflected borders).
* ``jpeg:quality[=20]``: every frame JPEG-encoded at ``quality`` (1-100, libjpeg's scale) and decoded.
* ``occlusion:area[=0.25]``: a black square of side ``round(sqrt(area · H · W))`` px at a random
  position, the same in every frame.

:class:`~fusionkit.data.dataset.ManifestDataset` applies one :class:`Corruption` (its ``corruption``
attribute) after decoding (and after the decoded-media memo, so that clean and corrupted passes
share one decoding of each clip): video ones to the test view's uint8 crop ``(T, 3, size, size)``
before normalisation, audio ones to the waveform ``(samples,)`` before any ``audio.frontend``. Draws
are deterministic: they come from ``(name, seed, clip_id, temporal clip)`` only, so a clip gets the
same corruption on every call, in every worker.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusionkit.errors import UsageError


@dataclass(frozen=True)
class Param:
    """One parameter of a corruption: its default, the rule its value must follow, and its type."""

    default: float
    rule: str
    valid: Callable[[float], bool]
    integer: bool = False


# -- audio ------------------------------------------------------------------------------------------

def shift_seconds(gen: torch.Generator, seconds: float, fixed: float) -> float:
    """The audio window's shift (s): ``seconds`` when ``fixed``, else uniform in ``[-seconds, seconds]``."""
    return float(seconds) if fixed else float((2 * torch.rand((), generator=gen, dtype=torch.float64) - 1) * seconds)


def drop_audio(wave: Tensor, rate: int, gen: torch.Generator, fraction: float, segment: float) -> Tensor:
    """``wave`` ``(n,)`` with exactly ``round(fraction · n)`` samples zeroed, in random gaps of
    ``round(segment · rate)`` samples (single samples with ``segment=0``)."""
    n = wave.shape[-1]
    block = max(1, int(round(segment * rate)))
    order = torch.randperm(math.ceil(n / block), generator=gen)
    idx = (order[:, None] * block + torch.arange(block)).flatten()
    out = wave.clone()
    out[idx[idx < n][: int(round(fraction * n))]] = 0
    return out


def pink(n: int, gen: torch.Generator) -> Tensor:
    """``(n,)`` float64 1/f noise: white Gaussian noise whose spectrum is divided by ``sqrt(f)``, DC removed."""
    spectrum = torch.fft.rfft(torch.randn(n, generator=gen, dtype=torch.float64))
    f = torch.arange(spectrum.shape[0], dtype=torch.float64)
    return torch.fft.irfft(spectrum * torch.where(f > 0, f.clamp(min=1).rsqrt(), 0.0), n=n)


def add_noise(wave: Tensor, noise: Tensor, snr: float) -> Tensor:
    """``wave + c · noise`` (both ``(n,)``) with ``c`` giving exactly ``snr`` dB; ``wave`` when either is silent."""
    signal = wave.double().pow(2).mean()
    power = noise.pow(2).mean()
    if wave.numel() == 0 or signal == 0 or power == 0:
        return wave
    scale = torch.sqrt(signal / (power * 10 ** (snr / 10)))
    return (wave.double() + scale * noise).to(wave.dtype)


def gaussian_noise(wave: Tensor, rate: int, gen: torch.Generator, snr: float) -> Tensor:
    """``wave`` ``(n,)`` plus white Gaussian noise at exactly ``snr`` dB."""
    return add_noise(wave, torch.randn(wave.shape[-1], generator=gen, dtype=torch.float64), snr)


def pink_noise(wave: Tensor, rate: int, gen: torch.Generator, snr: float) -> Tensor:
    """``wave`` ``(n,)`` plus pink (1/f) noise at exactly ``snr`` dB."""
    return add_noise(wave, pink(wave.shape[-1], gen), snr)


# -- video ------------------------------------------------------------------------------------------

def drop_frames(video: Tensor, gen: torch.Generator, fraction: float) -> Tensor:
    """uint8 ``(T, 3, H, W)`` with ``min(round(fraction · T), T - 1)`` random frames after the first
    replaced by the last kept frame before each."""
    t = video.shape[0]
    keep = torch.ones(t, dtype=torch.bool)
    keep[1 + torch.randperm(t - 1, generator=gen)[: min(int(round(fraction * t)), t - 1)]] = False
    source = torch.where(keep, torch.arange(t), 0).cummax(0).values
    return video[source]


def blur(video: Tensor, gen: torch.Generator, sigma: float) -> Tensor:
    """uint8 ``(T, 3, H, W)`` blurred by a Gaussian of ``sigma`` px (radius ``ceil(3 sigma)``, at most
    the frame's shorter side minus one)."""
    import torchvision.transforms.v2.functional as F

    radius = min(math.ceil(3 * sigma), min(video.shape[-2:]) - 1)
    return F.gaussian_blur(video, [2 * radius + 1] * 2, [sigma, sigma])


def jpeg(video: Tensor, gen: torch.Generator, quality: float) -> Tensor:
    """uint8 ``(T, 3, H, W)``, every frame JPEG-encoded at ``quality`` and decoded again.

    torchvision's codecs (libjpeg) mark themselves deprecated in favour of torchcodec, not a
    fusionkit dependency; the warning is silenced here."""
    from torchvision.io import decode_jpeg, encode_jpeg

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        encoded = encode_jpeg(list(video.contiguous()), quality=int(quality))
        return torch.stack(decode_jpeg(encoded))


def occlude(video: Tensor, gen: torch.Generator, area: float) -> Tensor:
    """uint8 ``(T, 3, H, W)`` with a black square of side ``round(sqrt(area · H · W))`` px at one
    random position, the same in every frame."""
    h, w = video.shape[-2:]
    side = min(int(round(math.sqrt(area * h * w))), h, w)
    top = int(torch.randint(h - side + 1, (), generator=gen))
    left = int(torch.randint(w - side + 1, (), generator=gen))
    out = video.clone()
    out[..., top:top + side, left:left + side] = 0
    return out


FLAG = Param(0, "0 or 1", lambda v: v in (0, 1), integer=True)
SNR = Param(10.0, "a number (dB)", math.isfinite)
SEED = Param(0, "an integer >= 0", lambda v: v >= 0, integer=True)

# name -> (what it acts on: "shift" | "audio" | "video", the function, its parameters, the first one first)
CORRUPTIONS: dict[str, tuple[str, Callable, dict[str, Param]]] = {
    "audio_shift": ("shift", shift_seconds, {"seconds": Param(2.0, "a number (s)", math.isfinite), "fixed": FLAG}),
    "audio_drop": ("audio", drop_audio, {"fraction": Param(0.2, "a number in [0, 1]", lambda v: 0 <= v <= 1),
                                         "segment": Param(0.0, "a number >= 0 (s)", lambda v: 0 <= v < math.inf)}),
    "gaussian_noise": ("audio", gaussian_noise, {"snr": SNR}),
    "pink_noise": ("audio", pink_noise, {"snr": SNR}),
    "frame_drop": ("video", drop_frames, {"fraction": Param(0.25, "a number in [0, 1)", lambda v: 0 <= v < 1)}),
    "blur": ("video", blur, {"sigma": Param(1.5, "a number > 0 (px)", lambda v: 0 < v < math.inf)}),
    "jpeg": ("video", jpeg, {"quality": Param(20, "an integer in [1, 100]", lambda v: 1 <= v <= 100, integer=True)}),
    "occlusion": ("video", occlude, {"area": Param(0.25, "a number in (0, 1]", lambda v: 0 < v <= 1)}),
}


def valid_specs() -> str:
    """Every corruption with its parameters and defaults, on one line."""
    return " | ".join(f"{name}:" + ",".join(f"{k}={p.default:g}" for k, p in params.items())
                      for name, (_, _, params) in CORRUPTIONS.items()) + " (each also seed=0)"


@dataclass(frozen=True)
class Corruption:
    """A parsed SPEC: ``name``, its ``params`` (defaults filled in) and ``seed``; ``spec`` is the text given."""

    spec: str
    name: str
    params: dict[str, float] = field(default_factory=dict)
    seed: int = 0

    @property
    def acts_on(self) -> str:
        """``shift`` (the audio window), ``audio`` (the waveform) or ``video`` (the frames)."""
        return CORRUPTIONS[self.name][0]

    def generator(self, key: Hashable) -> torch.Generator:
        """The generator of one clip's draw: a function of ``(name, seed, key)`` only."""
        digest = hashlib.sha256(repr((self.name, self.seed, key)).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def audio_shift(self, key: Hashable) -> float:
        """Seconds by which to move the clip's audio window (0 unless ``audio_shift``)."""
        if self.acts_on != "shift":
            return 0.0
        return CORRUPTIONS[self.name][1](self.generator(key), **self.params)

    def audio(self, wave: Tensor, rate: int, key: Hashable) -> Tensor:
        """The waveform ``(n,)`` at ``rate`` Hz, corrupted when this is an audio corruption."""
        if self.acts_on != "audio":
            return wave
        return CORRUPTIONS[self.name][1](wave, rate, self.generator(key), **self.params)

    def video(self, video: Tensor, key: Hashable) -> Tensor:
        """uint8 frames ``(T, 3, H, W)``, corrupted when this is a video corruption (same shape and dtype)."""
        if self.acts_on != "video":
            return video
        return CORRUPTIONS[self.name][1](video, self.generator(key), **self.params)


def _fail(spec: str, problem: str) -> UsageError:
    return UsageError(f"--corrupt {spec!r}: {problem}; valid: {valid_specs()}")


def _number(spec: str, key: str, text: str, param: Param) -> float:
    """``text`` as the value of ``param``, or a :class:`UsageError` stating its rule."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    whole = math.isfinite(value) and value == int(value)
    if not param.valid(value) or (param.integer and not whole):
        raise _fail(spec, f"{key} must be {param.rule}, got {text!r}")
    return int(value) if param.integer else value


def _arguments(spec: str, name: str, args: str) -> dict[str, str]:
    """``{key: text}`` of ``KEY=VALUE`` parts (a bare first part is the first parameter)."""
    keys = [*CORRUPTIONS[name][2], "seed"]
    given: dict[str, str] = {}
    for i, part in enumerate(args.split(",") if args else []):
        key, eq, value = part.partition("=")
        key, value = (key.strip(), value.strip()) if eq else (keys[0] if i == 0 else "", key.strip())
        if key in given:
            raise _fail(spec, f"{key} is given twice")
        if key not in keys:
            raise _fail(spec, f"{name} takes {', '.join(keys)} (KEY=VALUE, or the first one's value alone first), "
                              f"got {part.strip()!r}")
        given[key] = value
    return given


def parse(spec: str) -> Corruption:
    """A SPEC (``blur``, ``blur:2``, ``blur:sigma=2,seed=1``) as a :class:`Corruption`; a bad one raises
    :class:`~fusionkit.errors.UsageError` naming the problem and listing every valid SPEC."""
    text = spec.strip()
    name, _, args = text.partition(":")
    if name not in CORRUPTIONS:
        raise _fail(spec, f"unknown corruption {name!r}")
    given = _arguments(spec, name, args)
    params = {k: _number(spec, k, given[k], p) if k in given else p.default for k, p in CORRUPTIONS[name][2].items()}
    seed = _number(spec, "seed", given["seed"], SEED) if "seed" in given else 0
    return Corruption(text, name, params, int(seed))


def parse_all(specs: Sequence[str]) -> list[Corruption]:
    """Every SPEC parsed (:func:`parse`); the same SPEC twice is an error."""
    out = [parse(s) for s in specs]
    seen = [c.spec for c in out]
    twice = sorted({s for s in seen if seen.count(s) > 1})
    if twice:
        raise UsageError(f"--corrupt {twice[0]!r} is given twice")
    return out

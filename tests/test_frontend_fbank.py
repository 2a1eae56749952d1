"""kaldi_fbank front-end against HF's ASTFeatureExtractor (torchaudio and pure-numpy paths)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF
from transformers import ASTFeatureExtractor
from transformers.models.audio_spectrogram_transformer import feature_extraction_audio_spectrogram_transformer as hf_fe

from fusionkit.frontends import KaldiFbank
from fusionkit.registry import FRONTENDS


def chirp_and_noise(seconds: float = 2.0, rate: int = 16000, seed: int = 0) -> torch.Tensor:
    """A 100 Hz → 4 kHz linear chirp plus white noise, float32 ``(samples,)``."""
    t = torch.arange(int(seconds * rate), dtype=torch.float64) / rate
    chirp = 0.5 * torch.sin(2 * math.pi * (100 * t + (4000 - 100) / (2 * seconds) * t ** 2))
    noise = 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (chirp + noise).float()


def hf_features(wave: torch.Tensor, max_length: int, numpy_path: bool, monkeypatch) -> torch.Tensor:
    if numpy_path:  # HF's own numpy fbank, independent of torchaudio
        monkeypatch.setattr(hf_fe, "is_speech_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "at least one mel filter has all zero values" for 128 bins
        ext = ASTFeatureExtractor(num_mel_bins=128, max_length=max_length)
        out = ext(wave.numpy(), sampling_rate=16000, return_tensors="np")["input_values"]
    return torch.from_numpy(np.asarray(out[0], dtype=np.float32))


def test_registered():
    assert FRONTENDS.get("kaldi_fbank") is KaldiFbank


@pytest.mark.parametrize("numpy_path", [False, True], ids=["hf-torchaudio", "hf-numpy"])
def test_matches_hf_ast_feature_extractor(numpy_path, monkeypatch):
    wave = chirp_and_noise()  # 2 s: 198 frames, padded to 256
    ours = KaldiFbank(target_length=256)(wave[None])
    ref = hf_features(wave, 256, numpy_path, monkeypatch)
    assert ours.shape == (1, 256, 128) and ref.shape == (256, 128)
    assert ours.std() > 0.2  # a real spectrogram, not a constant
    torch.testing.assert_close(ours[0], ref, atol=3e-4 if numpy_path else 1e-4, rtol=0)
    # cropping: 1 s of frames cropped to 64
    ours_crop = KaldiFbank(target_length=64)(wave[None])
    torch.testing.assert_close(ours_crop[0], hf_features(wave, 64, numpy_path, monkeypatch),
                               atol=3e-4 if numpy_path else 1e-4, rtol=0)


def test_unnormalised_is_kaldi_fbank_with_ast_settings():
    wave = chirp_and_noise(seconds=0.5)
    ours = KaldiFbank(normalize=False, target_length=None)(wave[None])[0]
    ref = kaldi.fbank((wave - wave.mean())[None], htk_compat=True, sample_frequency=16000, use_energy=False,
                      window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
    assert ours.shape == ref.shape == (48, 128)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    normed = KaldiFbank(target_length=None, mean=-1.0, std=2.0)(wave[None])[0]
    torch.testing.assert_close(normed, (ref + 1.0) / 4.0)


def test_pad_and_crop_to_target_length():
    fb = KaldiFbank(num_mel_bins=32, target_length=100)
    wave = chirp_and_noise(seconds=0.5)  # 48 frames
    short = fb(wave[None])
    assert short.shape == (1, 100, 32) and short.dtype == torch.float32
    raw = KaldiFbank(num_mel_bins=32, target_length=None)(wave[None])
    torch.testing.assert_close(short[:, :48], raw)
    padded_value = (0.0 - fb.mean) / (2 * fb.std)  # zero-padded frames, then normalised (as AST/HF)
    torch.testing.assert_close(short[:, 48:], torch.full((1, 52, 32), padded_value))
    crop = KaldiFbank(num_mel_bins=32, target_length=20)(wave[None])
    torch.testing.assert_close(crop, raw[:, :20])
    assert fb.frames_for(8000) == 48 and fb.frames_for(399) == 0
    tiny = fb(torch.zeros(2, 100))  # shorter than one window: all padding
    torch.testing.assert_close(tiny, torch.full((2, 100, 32), padded_value))


def test_batch_shape_dtype_and_per_example():
    waves = torch.stack([chirp_and_noise(0.5, seed=0), 0.3 * chirp_and_noise(0.5, seed=1)])
    fb = KaldiFbank(num_mel_bins=64, target_length=50)
    out = fb(waves)
    assert out.shape == (2, 50, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out[1:], fb(waves[1:]))
    assert not torch.allclose(out[0], out[1])
    assert fb(waves.double()).dtype == torch.float64
    assert not list(fb.parameters())


def test_stereo_is_averaged_to_mono():
    wave = chirp_and_noise(0.5)
    side = 0.2 * torch.sin(torch.arange(wave.numel()) * 0.05)
    fb = KaldiFbank(num_mel_bins=32, target_length=64)
    stereo = torch.stack([wave + side, wave - side])[None]
    torch.testing.assert_close(fb(stereo), fb(wave[None]), atol=1e-5, rtol=0)
    torch.testing.assert_close(fb(wave[None, None]), fb(wave[None]))


def test_resampling_48k_stereo():
    """48 kHz stereo of a band-limited signal equals its 16 kHz mono version up to the resampler."""
    n = 48000
    g = torch.Generator().manual_seed(0)
    spec = torch.fft.rfft(torch.randn(n, generator=g, dtype=torch.float64))
    freqs = torch.fft.rfftfreq(n, 1 / 48000)
    spec[(freqs > 7000) | (freqs < 50)] = 0  # below 16 kHz's Nyquist: decimating by 3 is exact
    noise = torch.fft.irfft(spec, n)
    t = torch.arange(n, dtype=torch.float64) / 48000
    mono48 = 0.5 * torch.sin(2 * math.pi * (100 * t + 2950 * t ** 2)) + 0.05 * noise / noise.std()
    side = 0.3 * torch.sin(2 * math.pi * 440 * t)
    stereo48 = torch.stack([mono48 + side, mono48 - side]).float()[None]
    mono16 = mono48[::3].float()[None]

    ours = KaldiFbank(sample_rate=48000, target_length=None)(stereo48)
    # the pipeline exactly: downmix, torchaudio resample, fbank
    exact = KaldiFbank(target_length=None)(AF.resample(stereo48.mean(1), 48000, 16000))
    torch.testing.assert_close(ours, exact, atol=1e-6, rtol=0)
    # physically: the same spectrogram as the 16 kHz signal, up to the resampling filter's rolloff
    # (mel bands above ~5.5 kHz) and its edge effects (first/last frames)
    direct = KaldiFbank(target_length=None)(mono16)
    assert ours.shape == direct.shape == (1, 98, 128)
    diff = (ours - direct).abs()[0, 5:-5]
    assert diff[:, :100].max() < 5e-3
    assert diff.mean() < 5e-3
    # the per-call rate overrides the configured one
    torch.testing.assert_close(KaldiFbank(target_length=None)(stereo48, sample_rate=48000), ours)


def test_bad_inputs_are_clear():
    fb = KaldiFbank(num_mel_bins=32, target_length=10)
    with pytest.raises(ValueError, match=r"\(B, samples\) or \(B, channels, samples\).*waveform\[None\]"):
        fb(torch.randn(16000))
    with pytest.raises(ValueError, match=r"got shape \(1, 1, 1, 16000\)"):
        fb(torch.randn(1, 1, 1, 16000))
    with pytest.raises(ValueError, match="floating-point"):
        fb(torch.zeros(1, 16000, dtype=torch.int16))
    with pytest.raises(ValueError, match="sample_rate"):
        KaldiFbank(sample_rate=44100.5)


@pytest.mark.parametrize("options", [
    {},
    {"use_energy": True},
    {"use_energy": True, "htk_compat": False, "window_type": "hamming",
     "fbank_kwargs": {"round_to_power_of_two": False, "energy_floor": 0.0}},
    {"window_type": "povey", "frame_shift": 5.0, "fbank_kwargs": {"low_freq": 50.0, "preemphasis_coefficient": 0.0}},
    {"window_type": "rectangular", "subtract_mean": False, "fbank_kwargs": {"remove_dc_offset": False, "high_freq": -400.0}},
], ids=["ast", "energy", "hamming-energy-first", "povey", "rectangular"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_fbank_equals_torchaudio_per_example(options, dtype):
    fb = KaldiFbank(num_mel_bins=24, target_length=None, **options)
    assert fb.batchable()
    waves = torch.stack([chirp_and_noise(0.3, seed=s) * (s + 1) for s in range(3)]).to(dtype)
    ours = fb.fbank_batch(waves)
    ref = torch.stack([fb.fbank(w) for w in waves])  # torchaudio's kaldi.fbank, one example at a time
    assert ours.shape == ref.shape == (3, fb.frames_for(4800), fb.num_features) and ours.dtype == dtype
    assert ours.std() > 0.5
    torch.testing.assert_close(ours, ref, atol=1e-9 if dtype == torch.float64 else 1e-5, rtol=0)


@pytest.mark.parametrize("options", [{"dither": 1.0}, {"window_type": "blackman"},
                                     {"fbank_kwargs": {"snip_edges": False}}])
def test_options_the_batch_path_lacks_go_through_torchaudio(options):
    fb = KaldiFbank(num_mel_bins=24, target_length=None, **options)
    assert not fb.batchable()
    waves = torch.stack([chirp_and_noise(0.3, seed=s) for s in range(2)])
    torch.manual_seed(0)
    ours = fb.fbank_batch(waves)
    torch.manual_seed(0)
    torch.testing.assert_close(ours, torch.stack([fb.fbank(w) for w in waves]))

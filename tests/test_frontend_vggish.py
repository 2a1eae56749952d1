"""The ``vggish`` front-end: one 128-d vector per time step, windows centred on the steps, VGGish's
log-mel and layer layout, torchvggish-layout state dicts loaded exactly, and frame alignment."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from media import tone, write_video  # noqa: E402

import fusionkit  # noqa: F401, E402
from fusionkit.experts.pretrained import PretrainedError  # noqa: E402
from fusionkit.frontends.vggish import EXAMPLE_SAMPLES, VGGish, log_mel, mel_matrix  # noqa: E402
from fusionkit.registry import DATASETS, FRONTENDS  # noqa: E402

SMALL = {"widths": [4, 4, 8, 8], "hidden": 16}
TORCHVGGISH_KEYS = [f"features.{i}.{p}" for i in (0, 3, 6, 8, 11, 13) for p in ("weight", "bias")] + \
                   [f"embeddings.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]


def test_full_size_is_vggish():
    m = FRONTENDS.build("vggish", steps=3)
    assert list(m.state_dict()) == TORCHVGGISH_KEYS
    assert sum(p.numel() for p in m.parameters()) == 72_141_184  # VGGish: 72.1M
    assert m.embeddings[0].weight.shape == (4096, 512 * 6 * 4)
    assert not any(p.requires_grad for p in m.parameters())
    out = m(torch.randn(2, 16000) * 0.1)
    assert out.shape == (2, 3, 128) and (out >= 0).all()  # the embedding layer ends in a ReLU


def test_windows_are_centred_on_the_steps_and_zero_outside():
    steps, n = 4, 24000
    m = VGGish(steps=steps, **SMALL)
    wave = torch.arange(1, n + 1, dtype=torch.float32)[None]  # sample k holds k + 1
    win = m.windows(wave)
    assert win.shape == (1, steps, EXAMPLE_SAMPLES)
    for i in range(steps):
        centre = round((i + 0.5) * n / steps)
        assert win[0, i, EXAMPLE_SAMPLES // 2].item() == centre + 1
        expected = torch.arange(centre - EXAMPLE_SAMPLES // 2, centre + EXAMPLE_SAMPLES // 2) + 1.0
        expected[(expected < 1) | (expected > n)] = 0.0
        assert torch.equal(win[0, i], expected)


def test_log_mel_peaks_in_the_band_of_a_tone():
    t = torch.arange(EXAMPLE_SAMPLES) / 16000
    mel = log_mel(0.5 * torch.sin(2 * math.pi * 1000.0 * t))
    assert mel.shape == (96, 64)
    centres_mel = torch.linspace(1127 * math.log1p(125 / 700), 1127 * math.log1p(7500 / 700), 66)[1:-1]
    centres_hz = 700 * (torch.exp(centres_mel / 1127) - 1)
    assert mel.mean(0).argmax().item() == (centres_hz - 1000).abs().argmin().item()
    assert mel_matrix()[0].abs().sum() == 0  # the DC bin has no weight
    assert torch.allclose(log_mel(torch.zeros(EXAMPLE_SAMPLES)), torch.tensor(math.log(0.01)))


def test_state_dict_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    a = VGGish(steps=2, **SMALL)
    sd = {**a.state_dict(), "pproc.pca_means": torch.zeros(128)}  # torchvggish's post-processor: ignored
    torch.save(sd, tmp_path / "vggish.pth")
    torch.manual_seed(1)
    b = FRONTENDS.build("vggish", steps=2, checkpoint=str(tmp_path / "vggish.pth"), **SMALL)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    wave = torch.randn(1, 8000) * 0.1
    assert torch.equal(a(wave), b(wave))
    torch.save({k: v for k, v in sd.items() if not k.startswith("embeddings.4")}, tmp_path / "short.pth")
    with pytest.raises(PretrainedError, match="embeddings.4.weight"):
        VGGish(steps=2, checkpoint=str(tmp_path / "short.pth"), **SMALL)


def test_resamples_and_rejects_bad_input():
    m = VGGish(sample_rate=8000, steps=2, **SMALL)
    assert m(torch.zeros(3, 8000)).shape == (3, 2, 128)
    with pytest.raises(ValueError, match=r"\(B, samples\)"):
        m(torch.zeros(8000))


def test_dataset_steps_are_centred_on_the_sampled_frames(tmp_path):
    fps, frames, stride = 25, 4, 5
    video = write_video(tmp_path / "a.mp4", torch.zeros(40, 32, 32, 3, dtype=torch.uint8).numpy(), fps=fps,
                        audio=tone(1.6, 16000, 1, on=(0.0, 1.6)), sample_rate=16000)
    (tmp_path / "m.csv").write_text(f"path,label\n{video},a\n")
    seconds = frames * stride / fps
    ds = DATASETS.build("manifest", path=str(tmp_path / "m.csv"), modalities=["video", "audio"], frames=frames,
                        stride=stride, size=32,
                        audio={"seconds": seconds, "frontend": {"type": "vggish", "steps": frames, **SMALL}})
    item = ds[0]
    assert item["audio"].shape == (frames, 128)
    t0, t1 = item["span"].tolist()
    t0, t1 = (t0 + t1 - seconds) / 2, (t0 + t1 + seconds) / 2  # the audio window: `seconds` around the span
    step_centres = [t0 + (i + 0.5) * (t1 - t0) / frames for i in range(frames)]
    frame_centres = [(n + 0.5) / fps for n in item["frame_index"].tolist()]
    assert step_centres == pytest.approx(frame_centres, abs=1e-9)


def test_random_weights_are_the_same_in_every_dataset_and_leave_the_global_rng_alone():
    """Without a checkpoint the train, val and predict datasets each build a VGGish: one fixed seed
    makes them one extractor (otherwise evaluation would read other features than training)."""
    from fusionkit.frontends.vggish import VGGish

    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = VGGish(widths=(4, 4, 8, 8), hidden=16), VGGish(widths=(4, 4, 8, 8), hidden=16)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    other = VGGish(widths=(4, 4, 8, 8), hidden=16, seed=1)
    assert not torch.equal(other.features[0].weight, a.features[0].weight)

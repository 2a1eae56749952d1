"""The ``motion`` modality: H.264 motion vectors of a clip whose textured square moves by a known
step, decoded with PyAV, rasterised, and kept aligned with the video through crops, resizes and flips."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

import fusionkit  # noqa: F401
from fusionkit.data import decode
from fusionkit.data.collate import collate
from fusionkit.data.motion import decode_motion, geometric, rasterise
from fusionkit.registry import DATASETS

N, SIDE, SQ = 12, 64, 16
DX, DY = 4, -2  # the square's step per frame (pixels)
BG = 30


def square_at(i: int) -> tuple[int, int]:
    """Top-left (x, y) of the square in frame ``i``."""
    return 4 + DX * i, 40 + DY * i


def write_clip(path: Path, gop: int) -> Path:
    """64×64 H.264, no B-frames, one reference frame: every P-frame predicts from the previous frame."""
    tex = np.random.default_rng(0).integers(100, 256, (SQ, SQ, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width = vs.height = SIDE
        vs.pix_fmt = "yuv420p"
        vs.options = {"crf": "2", "g": str(gop), "bf": "0", "refs": "1", "preset": "veryfast"}
        for i in range(N):
            img = np.full((SIDE, SIDE, 3), BG, np.uint8)
            x, y = square_at(i)
            img[y:y + SQ, x:x + SQ] = tex
            for packet in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
    return path


def keyframes(path: Path) -> list[int]:
    with av.open(str(path)) as c:
        return [i for i, f in enumerate(c.decode(video=0)) if f.pict_type == av.video.frame.PictureType.I]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("motion")
    return {"long": write_clip(root / "long.mp4", gop=100), "short": write_clip(root / "short.mp4", gop=5)}


def square_mean(field: np.ndarray, t: int, i: int) -> tuple[float, float]:
    x, y = square_at(i)
    block = field[:, t, y:y + SQ, x:x + SQ]
    return float(block[0].mean()), float(block[1].mean())


def test_known_motion_and_convention(clips):
    idx = [0, 1, 5, 11]
    m = decode_motion(clips["long"], idx)
    assert m.shape == (2, len(idx), SIDE, SIDE) and m.dtype == np.float32
    assert keyframes(clips["long"]) == [0]
    assert not m[:, 0].any()  # the keyframe has no vectors
    for t, i in enumerate(idx[1:], start=1):
        dx, dy = square_mean(m, t, i)  # dx, dy = this frame's position minus the previous frame's
        assert dx == pytest.approx(DX, abs=0.5) and dy == pytest.approx(DY, abs=0.5)
    far = m[:, 1:, :8, 40:]  # a background corner the square never visits
    assert not far.any()


def test_keyframes_zero_and_seek_alignment(clips):
    path = clips["short"]
    keys = keyframes(path)
    assert len(keys) >= 2 and keys[0] == 0
    full = decode_motion(path, list(range(N)))
    for k in range(N):
        assert full[:, k].any() != (k in keys), k
    some = [9, 3, 9, keys[1]]  # unsorted, repeated, a mid-stream keyframe: decoded after a seek
    part = decode_motion(path, some)
    np.testing.assert_array_equal(part, full[:, some])


def test_rasterise_blocks_direction_and_bounds():
    dtype = np.dtype([("source", "<i4"), ("w", "u1"), ("h", "u1"), ("src_x", "<i2"), ("src_y", "<i2"),
                      ("dst_x", "<i2"), ("dst_y", "<i2"), ("flags", "<u8"), ("motion_x", "<i4"),
                      ("motion_y", "<i4"), ("motion_scale", "<u2")])
    mv = np.array([(-1, 8, 8, 0, 0, 4, 4, 0, -12, 8, 4),  # past, block [0, 8)², dx = 3, dy = -2
                   (1, 8, 8, 0, 0, 12, 4, 0, 40, 40, 4),  # future: ignored
                   (-1, 16, 16, 0, 0, 14, 14, 0, -2, 0, 2)], dtype=dtype)  # past, block [6, 22)² clipped
    f = rasterise(mv, 16, 16)
    assert f.shape == (2, 16, 16) and f.dtype == np.float32
    assert (f[0, :6, :6] == 3).all() and (f[1, :6, :6] == -2).all()
    assert (f[:, 6:8, 6:8] == np.array([2.0, -1.0], np.float32)[:, None, None]).all()  # overlap: averaged
    assert (f[0, 10:, 10:] == 1).all() and (f[1, 10:, 10:] == 0).all()
    assert not f[:, :6, 8:].any()  # the future-only block
    assert not rasterise(None, 4, 4).any()


def test_geometric_rescales_and_flips():
    m = torch.zeros(2, 3, 8, 8)
    m[0], m[1] = 4.0, -2.0
    half = geometric(m, lambda x: torch.nn.functional.interpolate(x, size=(4, 4), mode="bilinear"))
    assert half.shape == (2, 3, 4, 4)
    assert torch.allclose(half[0], torch.tensor(2.0)) and torch.allclose(half[1], torch.tensor(-1.0))
    flipped = geometric(m, lambda x: x.flip(-1))
    assert torch.allclose(flipped[0], torch.tensor(-4.0)) and torch.allclose(flipped[1], torch.tensor(-2.0))


def manifest(tmp_path: Path, clip: Path) -> Path:
    p = tmp_path / "m.csv"
    p.write_text(f"path,label\n{clip},a\n")
    return p


def square_mask(video: torch.Tensor) -> torch.Tensor:
    """``(T, H, W)`` pixels of the textured square in a normalised ``(3, T, H, W)`` clip (well above the background)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1, 1)
    return ((video * std + mean) * 255).mean(0) > BG + 40


def test_dataset_video_and_motion_aligned(clips, tmp_path):
    ds = DATASETS.build("manifest", path=str(manifest(tmp_path, clips["long"])), modalities=["video", "motion"],
                        frames=4, stride=3, size=32)
    item = ds[0]
    assert item["video"].shape == (3, 4, 32, 32) and item["motion"].shape == (2, 4, 32, 32)
    assert item["motion"].dtype == torch.float32
    assert item["frame_index"].tolist() == [1, 4, 7, 10]  # the centred window: no keyframe
    mask = square_mask(item["video"])
    for t in range(4):  # 64 → 32: the vectors are halved, and they sit where the square is
        inside = item["motion"][:, t][:, mask[t]]
        assert inside[0].median().item() == pytest.approx(DX / 2, abs=0.25)
        assert inside[1].median().item() == pytest.approx(DY / 2, abs=0.25)
    batch = collate([item, ds[0]])
    assert batch["motion"].shape == (2, 2, 4, 32, 32)
    alone = DATASETS.build("manifest", path=str(manifest(tmp_path, clips["long"])), modalities=["motion"],
                           frames=4, stride=3, size=32)[0]
    assert "video" not in alone and torch.equal(alone["motion"], item["motion"])


def test_dataset_train_flip_follows_video(clips, tmp_path):
    ds = DATASETS.build("manifest", path=str(manifest(tmp_path, clips["long"])), modalities=["video", "motion"],
                        frames=3, stride=2, size=SIDE, train=True, random_resized_crop=False, flip=True,
                        color_jitter=0.3, seed=0)
    seen = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        item = ds[0]
        mask = square_mask(item["video"])
        for t, i in enumerate(item["frame_index"].tolist()):
            if i == 0:
                assert not item["motion"][:, t].any()
                continue
            plain = square_at(i)[0] + SQ / 2 - 0.5  # the square's centre column, and mirrored
            mirrored = SIDE - 1 - plain
            if abs(plain - mirrored) < 8:  # too close to the middle to tell a flip from the video
                continue
            centre = mask[t].nonzero()[:, 1].float().mean().item()
            flipped = abs(centre - mirrored) < abs(centre - plain)
            seen.add(flipped)
            inside = item["motion"][:, t][:, mask[t]]
            assert inside[0].median().item() == pytest.approx(-DX if flipped else DX, abs=0.25)
            assert inside[1].median().item() == pytest.approx(DY, abs=0.25)
    assert seen == {True, False}


def test_no_video_stream_is_decode_error(tmp_path):
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(b"\x00" * 512)
    with pytest.raises(decode.DecodeError):
        decode_motion(bad, [0])

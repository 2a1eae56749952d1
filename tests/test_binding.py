"""The binding benchmark (fusionkit.data.binding): determinism, the MP4 round trip through the
registered dataset, the shortcuts its design closes (on sampled / rendered clips, no encoding), and
the cache."""

from __future__ import annotations

import csv
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import fusionkit  # noqa: F401 - registers the datasets
from fusionkit.data import binding
from fusionkit.data.binding import (DIRECTIONS, FRAMES, HALF_PATH, PITCHES, SAMPLE_RATE, SHAPES, SPRITE, SPRITES,
                                    STEPS, BindingDataset, clip_rng, frame_mask, paint, render_clip, sample_clip,
                                    set_folder, trajectory, write_binding, write_clip)
from fusionkit.engine.config import check_dataset_spec
from fusionkit.recipes import RecipeError
from fusionkit.registry import DATASETS

N = 8000  # sampled clips for the shortcut statistics
PER = SAMPLE_RATE // FRAMES  # audio samples per frame


def facts(kind: str, n: int, split: str = "train", seed: int = 0) -> dict[str, np.ndarray]:
    """Column arrays ``(n,)`` of the labels of clips ``0 … n-1``."""
    rows = [sample_clip(kind, clip_rng(kind, split, seed, i)) for i in range(n)]
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    f = facts("binding", N)
    f["m_mean"] = np.stack([f["m_y"], f["m_x"]], 1) + STEPS[f["direction"]] * HALF_PATH // 2  # time-averaged
    f["s_pos"] = np.stack([f["s_y"], f["s_x"]], 1)
    return f


def lookup_accuracy(keys: np.ndarray, y: np.ndarray) -> float:
    """Held-out accuracy of the Bayes classifier of discrete ``keys`` ``(n, K)``: fitted (most frequent
    ``y`` per key) on the first half, scored on the second; an unseen key predicts class 0."""
    _, inv = np.unique(keys.reshape(len(y), -1), axis=0, return_inverse=True)
    inv, half = inv.ravel(), len(y) // 2
    counts = np.zeros((inv.max() + 1, y.max() + 1))
    np.add.at(counts, (inv[:half], y[:half]), 1)
    return float((counts.argmax(1)[inv[half:]] == y[half:]).mean())


def linear_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Held-out accuracy of a least-squares one-vs-all linear classifier (with bias) from ``x`` ``(n, F)``."""
    half = len(y) // 2
    a = np.c_[x, np.ones(len(x))]
    w = np.linalg.lstsq(a[:half], np.eye(y.max() + 1)[y[:half]], rcond=None)[0]
    return float(((a[half:] @ w).argmax(1) == y[half:]).mean())


def colours(f: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    return np.stack([f[f"{prefix}{c}"] for c in "rgb"], 1).astype(float)


def object_at(frames: np.ndarray, k: int, y: int, x: int) -> np.ndarray:
    """The ``(7, 7, 3)`` patch of frame ``k`` at top-left ``(y, x)``."""
    return frames[k, y:y + SPRITE, x:x + SPRITE]


def classify_shape(patch: np.ndarray, rgb: np.ndarray) -> int:
    """The sprite closest to ``patch`` ``(7, 7, 3)`` projected on its colour ``rgb``."""
    level = patch.astype(float) @ rgb / float(rgb @ rgb)
    return int(np.argmin([((level - s) ** 2).sum() for s in SPRITES]))


def window_rms(audio: np.ndarray, margin: int = 160) -> np.ndarray:
    """``(8,)`` RMS of each frame's 1/8 s of ``audio`` ``(16000,)``, ``margin`` samples (10 ms) off each edge."""
    w = np.asarray(audio, dtype=np.float64).reshape(FRAMES, PER)[:, margin:PER - margin]
    return np.sqrt((w ** 2).mean(1))


def expected_objects(lab: dict, kind: str = "binding") -> list[tuple[int, int, int, np.ndarray] | None]:
    """Per frame ``(shape, y, x, rgb)`` of the visible object (None: empty frame)."""
    if kind == "pretrain":
        path, on = trajectory(lab["y"], lab["x"], lab["direction"]), frame_mask(lab["frames"])
        rgb = np.array([lab[c] for c in "rgb"])
        return [(lab["shape"], *path[k], rgb) if on[k] else None for k in range(FRAMES)]
    path, on = trajectory(lab["m_y"], lab["m_x"], lab["direction"]), frame_mask(lab["m_frames"])
    m = np.array([lab[f"m_{c}"] for c in "rgb"])
    s = np.array([lab[f"s_{c}"] for c in "rgb"])
    return [(lab["moving_shape"], *path[k], m) if on[k] else (lab["still_shape"], lab["s_y"], lab["s_x"], s)
            for k in range(FRAMES)]


# -- 1. determinism ---------------------------------------------------------------------------------

def test_same_seed_same_clips_other_seed_or_split_differs():
    for kind in binding.KINDS:
        for i in range(10):
            a, b = render_clip(kind, clip_rng(kind, "train", 0, i)), render_clip(kind, clip_rng(kind, "train", 0, i))
            assert a[2] == b[2]
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
        base = facts(kind, 50)
        for other in (facts(kind, 50, seed=1), facts(kind, 50, split="test")):
            assert any(not np.array_equal(base[k], other[k]) for k in base)
            assert (base["direction"] != other["direction"]).mean() > 0.5


def test_files_identical_for_any_worker_count_and_facts_describe_clips(tmp_path):
    one = write_binding(tmp_path / "a", "binding", 6, 3, workers=1, progress=False, split="val")
    two = write_binding(tmp_path / "b", "binding", 6, 3, workers=2, progress=False, split="val")
    names = sorted(p.name for p in one.parent.iterdir())
    assert names == sorted(p.name for p in two.parent.iterdir())
    for name in names:
        assert (one.parent / name).read_bytes() == (two.parent / name).read_bytes(), name
    with (one.parent / "facts.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for i, row in enumerate(rows):
        frames, audio, labels = render_clip("binding", clip_rng("binding", "val", 3, i))
        assert row.pop("path") == f"clip_{i:05d}.mp4"
        assert {k: int(v) for k, v in row.items()} == labels
        repainted = paint("binding", labels)
        np.testing.assert_array_equal(repainted[0], frames)
        np.testing.assert_array_equal(repainted[1], audio)


# -- rendering follows the facts ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", binding.KINDS)
def test_pixels_and_audio_follow_the_facts(kind):
    for i in range(150):
        frames, audio, lab = render_clip(kind, clip_rng(kind, "train", 0, i))
        assert frames.shape == (FRAMES, 32, 32, 3) and frames.dtype == np.uint8
        assert audio.shape == (SAMPLE_RATE,) and audio.dtype == np.float32
        expected = np.zeros_like(frames)
        objects = expected_objects(lab, kind)
        for k, obj in enumerate(objects):
            if obj is not None:
                shape, y, x, rgb = obj
                assert 0 <= min(y, x) and max(y, x) <= 32 - SPRITE
                assert rgb.max() >= binding.BRIGHT
                object_at(expected, k, y, x)[SPRITES[shape]] = rgb
        np.testing.assert_array_equal(frames, expected)
        if kind == "binding":
            assert lab["motion"] == lab["moving_shape"] * 4 + lab["direction"]
            sounding_shape = lab["moving_shape"] if lab["sounding"] == 0 else lab["still_shape"]
            assert lab["sound"] == sounding_shape * 4 + lab["pitch"]
            on = frame_mask(lab["m_frames"]) == (lab["sounding"] == 0)
        else:
            on = frame_mask(lab["frames"])
        rms = window_rms(audio)
        assert (rms[on] > 0.3).all() and (rms[~on] == 0).all()
        spectrum = np.abs(np.fft.rfft(audio))
        assert spectrum.argmax() == PITCHES[lab["pitch"]]  # 1 s of audio: bin k is k Hz


def test_shapes_stay_distinct_and_one_object_per_frame():
    assert [int(s.sum()) for s in SPRITES] == [49, 24, 33, 33]
    flat = SPRITES.reshape(4, -1).astype(int)
    assert (np.abs(flat[:, None] - flat[None]).sum(-1) + np.eye(4, dtype=int) * 99).min() >= 16  # >= 16 px apart


# -- 2. the MP4 round trip through the registered dataset -------------------------------------------

def test_round_trip_through_the_registered_dataset(tmp_path):
    ds = BindingDataset(kind="binding", split="test", count=16, seed=0, root=tmp_path, workers=1, progress=False)
    assert DATASETS.get("binding") is BindingDataset and ds.train is False
    assert ds.reads_fixed and ds.decoded_cache_dir == ds.manifest.path.parent / "decoded"
    short = BindingDataset(kind="binding", split="test", count=16, seed=0, root=tmp_path, frames=4,
                           decoded_cache_dir=None, progress=False)
    assert not short.reads_fixed and short.decoded_cache_dir is None
    assert ds.class_names("motion")[:5] == ["square-right", "square-left", "square-down", "square-up", "ring-right"]
    assert ds.class_names("sound")[-1] == "x-2000Hz" and ds.num_classes("sound") == 16
    trained = BindingDataset(kind="binding", split="test", count=16, seed=0, root=tmp_path, train=True,
                             progress=False)
    for i in range(len(ds)):
        frames, audio, lab = render_clip("binding", clip_rng("binding", "test", 0, i))
        item = ds[i]
        assert {h: int(v) for h, v in item["labels"].items()} == {"motion": lab["motion"], "sound": lab["sound"]}
        torch.testing.assert_close(trained[i]["video"], item["video"], rtol=0, atol=0)  # train: no crop, no shift
        video = (item["video"] * 0.5).mul(255).round().permute(1, 2, 3, 0).numpy().astype(int)
        assert video.shape == frames.shape
        chroma = np.stack([av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p")
                           .to_ndarray(format="rgb24") for f in frames]).astype(int)
        assert np.abs(video - chroma).max() <= 8  # the codec is near-lossless; the colour loss is yuv420p's
        assert np.abs(video - frames).mean() < 2.5
        for k, (shape, y, x, rgb) in enumerate(expected_objects(lab)):
            assert classify_shape(object_at(video, k, y, x), rgb) == shape
        wave = item["audio"].numpy()
        assert wave.shape == (SAMPLE_RATE,)
        on = frame_mask(lab["m_frames"]) == (lab["sounding"] == 0)
        rms = window_rms(wave)
        assert (rms[on] > 0.3).all() and (rms[~on] < 0.02).all(), rms
        lag = np.correlate(wave, audio, "full").argmax() - (len(audio) - 1)
        assert abs(lag) <= 1  # AAC priming is trimmed: the audio is aligned with the frames


def test_clips_decode_to_exactly_the_encoders_input(tmp_path):
    """Lossless H.264: every decoded frame's yuv420p planes equal those of the rendered frame, so the
    decoded data cannot depend on the encoder's decisions (which vary between runs at crf > 0)."""
    for index in range(6):
        row = write_clip((str(tmp_path), "binding", "train", 3, index))
        frames, _, _ = render_clip("binding", clip_rng("binding", "train", 3, index))
        with av.open(str(tmp_path / row["path"])) as container:
            decoded = [f.to_ndarray(format="yuv420p") for f in container.decode(video=0)]
        drawn = [av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p").to_ndarray() for f in frames]
        assert len(decoded) == len(drawn) == FRAMES
        for got, want in zip(decoded, drawn):
            np.testing.assert_array_equal(got, want)


def test_pretrain_set_and_recipe_spec(tmp_path):
    spec = {"type": "binding", "kind": "pretrain", "split": "val", "count": 4, "seed": 1, "root": str(tmp_path),
            "modalities": ["video"], "train": False, "views": {"clips": 1, "crops": 1},
            "audio": {"sample_rate": 16000}, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
            "random_resized_crop": False, "flip": False, "heads": {"shape": "shape"}, "frames": 8, "size": 32,
            "sampling": "dense", "stride": 1}
    assert check_dataset_spec("data.train", spec) is BindingDataset
    with pytest.raises(RecipeError, match="colour"):
        check_dataset_spec("data.train", {"type": "binding", "colour": True})
    ds = BindingDataset(**{k: v for k, v in spec.items() if k != "type"}, progress=False)
    assert ds.heads == {"shape": "shape"} and ds.class_names("shape") == list(SHAPES)
    assert (ds.manifest.path.parent / "direction.txt").read_text().split() == list(DIRECTIONS)
    item = ds[0]
    assert item["video"].shape == (3, 8, 32, 32) and "audio" not in item
    assert int(item["labels"]["shape"]) == sample_clip("pretrain", clip_rng("pretrain", "val", 1, 0))["shape"]


# -- 3. shortcuts ----------------------------------------------------------------------------------------

def test_colour_carries_no_label(clips):
    m, s = colours(clips, "m_"), colours(clips, "s_")
    assert (m.max(1) >= binding.BRIGHT).all() and (s.max(1) >= binding.BRIGHT).all()
    for head in ("motion", "sound"):
        y = clips[head]
        assert linear_accuracy(np.c_[m, s], y) < 1 / 16 + 0.02
        for rgb in (m, s):
            assert lookup_accuracy(rgb // 64, y) < 1 / 16 + 0.02  # 4 levels per channel: 64 colour bins
    assert lookup_accuracy(m // 64, clips["sounding"]) < 0.53
    control = np.c_[m, np.eye(4)[clips["moving_shape"]]]  # the classifier does find a real signal
    assert linear_accuracy(control, clips["motion"]) > 0.2


def test_objects_never_overlap(clips):
    path = clips["m_mean"][:, None] + STEPS[clips["direction"]][:, None] * (np.arange(FRAMES)[:, None] - 3.5)
    gap = np.abs(path - clips["s_pos"][:, None])
    assert ((gap >= SPRITE + 1).any(-1)).all()  # >= 1 px between S and M in every frame
    apart = np.abs(clips["m_mean"] - clips["s_pos"])
    assert (apart >= SPRITE + 1).all()  # ... and S is clear of the paths of all four directions
    assert path.min() >= 0 and path.max() <= 32 - SPRITE


def test_positions_tell_neither_direction_nor_which_object_moves(clips):
    d, m, s = clips["direction"], clips["m_mean"], clips["s_pos"]
    for keys in (m, s, s - m, np.c_[m, s]):
        assert lookup_accuracy(keys, d) < 0.25 + 0.03
        assert linear_accuracy(np.c_[keys, keys ** 2], d) < 0.25 + 0.03
    for axis in range(2):  # the time-averaged position has one distribution for every direction
        hist = np.stack([np.bincount(m[d == k, axis], minlength=32) / (d == k).sum() for k in range(4)])
        assert np.abs(hist - hist.mean(0)).max() < 0.03
    start = np.stack([clips["m_y"], clips["m_x"]], 1)
    assert lookup_accuracy(start, d) > 0.5  # the estimator does find a real signal
    first = (m[:, 0] < s[:, 0]) | ((m[:, 0] == s[:, 0]) & (m[:, 1] < s[:, 1]))  # M is the first of the pair
    pair = np.where(first[:, None], np.c_[m, s], np.c_[s, m])
    assert lookup_accuracy(pair, first.astype(int)) < 0.55  # static positions do not say which one moves
    centre = np.array([12.5, 12.5])
    nearer = np.linalg.norm(m - centre, axis=1) - np.linalg.norm(s - centre, axis=1)
    assert abs((nearer < 0).mean() - (nearer > 0).mean()) < 0.03


def test_equal_on_frame_counts(clips):
    counts = np.array([frame_mask(b).sum() for b in clips["m_frames"]])
    assert (counts == FRAMES // 2).all()  # M 4 frames, S the other 4; the tone follows one of them
    pretrain = facts("pretrain", 2000)
    shown = np.array([frame_mask(b).sum() for b in pretrain["frames"]])
    assert shown.min() == 4 and shown.max() == 8
    assert (np.abs(np.bincount(shown)[4:] / len(shown) - 0.2) < 0.04).all()


def test_sounding_object_is_independent(clips):
    sounding = clips["sounding"]
    assert abs(sounding.mean() - 0.5) < 0.02
    for column in ("direction", "moving_shape", "still_shape", "pitch"):
        for v in range(4):
            assert abs(sounding[clips[column] == v].mean() - 0.5) < 0.05, (column, v)
    keys = np.stack([clips[c] for c in ("direction", "moving_shape", "still_shape", "pitch")], 1)
    assert lookup_accuracy(keys, sounding) < 0.55
    first_frame = clips["m_frames"] & 1  # which object shows first does not tell either
    assert abs(sounding[first_frame == 1].mean() - 0.5) < 0.03


def test_classes_are_balanced(clips):
    for head in ("motion", "sound"):
        counts = np.bincount(clips[head], minlength=16)
        assert len(counts) == 16 and (np.abs(counts / (N / 16) - 1) < 0.3).all(), (head, counts)
    assert (clips["moving_shape"] != clips["still_shape"]).all()
    pretrain = facts("pretrain", 2000)
    for head in binding.HEADS["pretrain"]:
        assert (np.abs(np.bincount(pretrain[head], minlength=4) / 500 - 1) < 0.3).all(), head
    mean = np.stack([pretrain["y"], pretrain["x"]], 1) + STEPS[pretrain["direction"]] * HALF_PATH // 2
    assert lookup_accuracy(mean, pretrain["direction"]) < 0.25 + 0.05


def test_late_fusion_oracle_is_at_half(clips):
    """Knowing the shapes present (unordered), the direction and the pitch, but not which object moves
    or sounds, the best guess of either label is right half of the time."""
    low, high = np.minimum(clips["moving_shape"], clips["still_shape"]), np.maximum(clips["moving_shape"],
                                                                                    clips["still_shape"])
    keys = np.stack([low, high, clips["direction"], clips["pitch"]], 1)
    for head in ("motion", "sound"):
        assert 0.45 < lookup_accuracy(keys, clips[head]) <= 0.55, head
    bound = np.c_[keys, clips["moving_shape"]]  # with the binding itself the label is known
    assert lookup_accuracy(bound, clips["motion"]) > 0.95


# -- 4. the cache ----------------------------------------------------------------------------------------

def boom(*args, **kwargs):
    raise AssertionError("the cached set was generated again")


def test_cached_set_is_returned_untouched(tmp_path, monkeypatch):
    manifest = write_binding(tmp_path, "binding", 4, 0, workers=1, progress=False)
    assert manifest == set_folder(tmp_path, "binding", "train", 4, 0) / "manifest.csv"
    assert manifest.parent.parent.name == f"binding-v{binding.VERSION}"
    stamps = {p.name: p.stat().st_mtime_ns for p in manifest.parent.iterdir()}
    assert {"manifest.csv", "facts.csv", "meta.json", "motion.txt", "sound.txt", "clip_00003.mp4"} <= set(stamps)
    assert manifest.read_text().splitlines()[0] == "path,motion,sound"
    monkeypatch.setattr(binding, "write_clip", boom)
    assert write_binding(tmp_path, "binding", 4, 0, workers=1, progress=False) == manifest
    assert {p.name: p.stat().st_mtime_ns for p in manifest.parent.iterdir()} == stamps


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_generation_leaves_no_manifest(tmp_path, monkeypatch, workers):
    real = binding.write_video

    def failing(path, *args, **kwargs):
        if Path(path).name == "clip_00005.mp4":
            raise RuntimeError("disk full")
        return real(path, *args, **kwargs)

    (tmp_path / "keep.txt").write_text("not ours")
    monkeypatch.setattr(binding, "write_video", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_binding(tmp_path, "binding", 8, 0, workers=workers, progress=False)
    assert list((tmp_path / f"binding-v{binding.VERSION}").iterdir()) == []  # no set, no temporary folder
    assert (tmp_path / "keep.txt").read_text() == "not ours"


def test_partial_or_stale_set_is_replaced(tmp_path):
    folder = set_folder(tmp_path, "binding", "train", 4, 0)
    folder.mkdir(parents=True)
    (folder / "manifest.csv").write_text("path,motion,sound\n" + "".join(f"clip_{i:05d}.mp4,0,0\n" for i in range(4)))
    (folder / "clip_00000.mp4").write_bytes(b"half a file")
    (folder / "meta.json").write_text('{"version": 0}')
    (folder.parent / "neighbour.txt").write_text("not ours")
    manifest = write_binding(tmp_path, "binding", 4, 0, workers=1, progress=False)
    with manifest.open() as fh:
        paths = [row["path"] for row in csv.DictReader(fh)]
    assert paths == [f"clip_{i:05d}.mp4" for i in range(4)]
    assert all((folder / p).stat().st_size > 1000 for p in paths)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name, "neighbour.txt"]
    assert oct(folder.stat().st_mode & 0o777) == "0o755"

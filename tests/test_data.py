"""fusionkit.data on real files written by PyAV: H.264 + AAC at several rates and channel counts,
a video without audio, MPEG-4 in Matroska, a side WAV, and corrupt / truncated / missing files."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import media  # noqa: E402

import fusionkit  # noqa: E402,F401
from fusionkit.data import decode, sampling  # noqa: E402
from fusionkit.data.collate import Skipped, collate  # noqa: E402
from fusionkit.data.dataset import ManifestDataset, MissingAudioError  # noqa: E402
from fusionkit.data.loader import build_loader, seed_worker  # noqa: E402
from fusionkit.data.manifest import Manifest, ManifestError, parse_time  # noqa: E402
from fusionkit.data.transforms import NORMS, view_crop  # noqa: E402
from fusionkit.registry import DATASETS  # noqa: E402

TONE_ON = (1.0, 1.5)  # seconds the tone sounds in the container audio
WAV_ON = (0.4, 0.8)  # ... in the side WAV
SIZE = 32


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    """media/: the files; lists/: class-name files and manifests that point at ../media/."""
    root = tmp_path_factory.mktemp("data")
    m = root / "media"
    m.mkdir()
    frames25 = media.index_frames(50)  # 2 s at 25 fps
    frames20 = media.index_frames(40)  # 2 s at 20 fps
    media.write_video(m / "stereo44k.mp4", frames25, 25, media.tone(2.0, 44100, 2, TONE_ON), 44100)
    media.write_video(m / "mono48k.mp4", frames20, 20, media.tone(2.0, 48000, 1, TONE_ON), 48000)
    media.write_video(m / "six16k.mp4", frames25, 25, media.tone(2.0, 16000, 6, TONE_ON, only_channel=0), 16000)
    media.write_video(m / "silent.mp4", frames25, 25)
    media.write_video(m / "mpeg4.mkv", frames25, 25, codec="mpeg4")
    media.write_wav(m / "side.wav", media.tone(2.0, 22050, 2, WAV_ON), 22050)
    media.write_audio_only(m / "speech.m4a", media.tone(3.0, 32000, 1, (1.0, 2.0)), 32000)
    media.write_corrupt(m / "truncated.mp4", m / "stereo44k.mp4")
    media.write_corrupt(m / "garbage.mp4")
    (root / "lists").mkdir()
    return root


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def dataset(media_dir: Path, rows: list[str], header: str = "path,start,end,label", name: str = "m.csv",
            **kwargs) -> ManifestDataset:
    path = write_csv(media_dir / "lists" / name, header, rows)
    kwargs.setdefault("size", SIZE)
    return DATASETS.build("manifest", path=str(path), **kwargs)


def unnormalise(video: torch.Tensor, norm: str = "imagenet") -> torch.Tensor:
    """Normalised ``(3, T, H, W)`` back to [0, 255]."""
    mean, std = (torch.tensor(v).view(3, 1, 1, 1) for v in NORMS[norm])
    return (video * std + mean) * 255


def onset(wave: torch.Tensor, rate: int = 16000, hop: int = 80) -> tuple[float, float]:
    """First and last time (s) the 5 ms RMS envelope exceeds half its peak."""
    env = wave[: wave.shape[0] // hop * hop].reshape(-1, hop).pow(2).mean(1).sqrt()
    on = (env > env.max() / 2).nonzero().flatten()
    return on[0].item() * hop / rate, (on[-1].item() + 1) * hop / rate


# --- sampling ---------------------------------------------------------------------------------

def test_dense_indices_stride_offset_and_clamp():
    assert sampling.dense_indices(100, 4, 3, position=0.0) == [0, 3, 6, 9]
    assert sampling.dense_indices(100, 4, 3, position=1.0) == [90, 93, 96, 99]
    assert sampling.dense_indices(100, 4, 3, position=0.5) == [45, 48, 51, 54]
    assert sampling.dense_indices(5, 4, 3, position=0.5) == [0, 3, 4, 4]  # short span: last frame repeats
    rng = random.Random(0)
    starts = {sampling.dense_indices(30, 4, 2, None, rng)[0] for _ in range(200)}
    assert starts == set(range(0, 24))  # every start in [0, 30 - 7] reachable, nothing beyond


def test_segment_indices_one_per_segment():
    assert sampling.segment_indices(80, 8, position=0.5) == [5, 15, 25, 35, 45, 55, 65, 75]
    assert sampling.segment_indices(80, 8, position=0.0) == [0, 10, 20, 30, 40, 50, 60, 70]
    assert sampling.segment_indices(4, 8, position=0.5) == [0, 0, 1, 1, 2, 2, 3, 3]
    rng = random.Random(1)
    seen = [set() for _ in range(8)]
    for _ in range(300):
        for k, i in enumerate(sampling.segment_indices(80, 8, None, rng)):
            assert 10 * k <= i < 10 * (k + 1)
            seen[k].add(i)
    assert all(len(s) == 10 for s in seen)
    with pytest.raises(ValueError, match="unknown sampling"):
        sampling.sample_indices("tsn", 10)


def test_clip_and_crop_positions():
    assert sampling.clip_positions("dense", 1) == [0.5]
    assert sampling.clip_positions("dense", 3) == [0.0, 0.5, 1.0]
    assert sampling.clip_positions("segment", 2) == [0.25, 0.75]
    assert sampling.crop_positions(3) == [0.0, 0.5, 1.0]


# --- decoding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,fps,frames,rate,channels", [
    ("stereo44k.mp4", 25, 50, 44100, 2), ("mono48k.mp4", 20, 40, 48000, 1), ("six16k.mp4", 25, 50, 16000, 6),
    ("silent.mp4", 25, 50, 0, 0), ("mpeg4.mkv", 25, 50, 0, 0)])
def test_probe_and_read_frames(media_dir, name, fps, frames, rate, channels):
    path = media_dir / "media" / name
    info = decode.probe(path)
    assert (info.fps, info.num_frames, info.sample_rate, info.channels) == (fps, frames, rate, channels)
    assert (info.width, info.height) == (64, 48) and info.has_audio == bool(rate)
    numbers = [frames - 1, 3, 17, 18, 30, 3, frames + 1]  # unsorted, repeated, one past the end (header over-count)
    out = decode.read_frames(path, numbers, info)
    assert out.shape == (7, 48, 64, 3) and out.dtype == np.uint8
    assert media.frame_index(out) == [frames - 1, 3, 17, 18, 30, 3, frames - 1]


@pytest.mark.parametrize("name", ["truncated.mp4", "garbage.mp4", "does_not_exist.mp4"])
def test_broken_files_raise_decode_error(media_dir, name):
    with pytest.raises(decode.DecodeError):
        decode.read_frames(media_dir / "media" / name, [0])
    with pytest.raises(decode.DecodeError):
        decode.probe(media_dir / "media" / name)


def test_truncated_stream_far_past_its_end_is_an_error(media_dir):
    with pytest.raises(decode.DecodeError, match="truncated"):
        decode.read_frames(media_dir / "media" / "silent.mp4", [0, 80])


@pytest.mark.parametrize("name", ["stereo44k.mp4", "mono48k.mp4", "six16k.mp4"])
def test_read_audio_cut_resample(media_dir, name):
    wave = decode.read_audio(media_dir / "media" / name, 0.7, 1.9, 16000)
    assert wave.dtype == torch.float32 and wave.shape == (19200,)
    t_on, t_off = onset(wave)
    assert abs(0.7 + t_on - TONE_ON[0]) < 0.01 and abs(0.7 + t_off - TONE_ON[1]) < 0.01
    spectrum = torch.fft.rfft(wave[int(0.35 * 16000):int(0.75 * 16000)]).abs()
    assert abs(spectrum.argmax().item() * 16000 / 6400 - media.TONE_HZ) < 5  # pitch survives the resampling
    rms = wave[int(0.4 * 16000):int(0.7 * 16000)].pow(2).mean().sqrt().item()
    expected = 0.5 / math.sqrt(2) / (6 if name == "six16k.mp4" else 1)  # 6 channels, tone in one: mean / 6
    assert rms == pytest.approx(expected, rel=0.15)


def test_read_audio_other_rates_and_no_track(media_dir):
    wave = decode.read_audio(media_dir / "media" / "side.wav", 0.0, 1.0, 8000)
    assert wave.shape == (8000,)
    t_on, t_off = onset(wave, 8000, 40)
    assert abs(t_on - WAV_ON[0]) < 0.01 and abs(t_off - WAV_ON[1]) < 0.01
    assert decode.read_audio(media_dir / "media" / "silent.mp4", 0.0, 1.0) is None
    tail = decode.read_audio(media_dir / "media" / "stereo44k.mp4", 1.8, 2.6)  # runs past the end: zeros
    assert tail.shape == (12800,) and tail[-4000:].abs().max() == 0


# --- the dataset --------------------------------------------------------------------------------

def test_dataset_frames_respect_span_and_sampling(media_dir):
    ds = dataset(media_dir, ["../media/stereo44k.mp4,0.4,1.8,a", "../media/mono48k.mp4,,,b"], frames=8,
                 sampling="segment")
    item = ds[0]
    assert item["video"].shape == (3, 8, SIZE, SIZE) and item["video"].dtype == torch.float32
    # span [0.4, 1.8) at 25 fps = frames 10..44 (35 frames), 8 segments, centres
    expected = [10 + i for i in sampling.segment_indices(35, 8, 0.5)]
    assert item["frame_index"].tolist() == expected
    assert media.frame_index(unnormalise(item["video"])) == expected
    item = ds[1]  # no span: the whole 40-frame file at 20 fps
    assert media.frame_index(unnormalise(item["video"])) == sampling.segment_indices(40, 8, 0.5)
    dense = dataset(media_dir, ["../media/stereo44k.mp4,0.4,1.8,a"], frames=8, stride=2)
    # 35 frames, window 15, slack 20, centred start 10: frames 20, 22, ..., 34
    assert media.frame_index(unnormalise(dense[0]["video"])) == list(range(20, 35, 2))
    assert dense[0]["labels"]["label"].dtype == torch.int64 and dense[0]["labels"]["label"].dim() == 0


@pytest.mark.parametrize("name", ["stereo44k.mp4", "mono48k.mp4", "six16k.mp4"])
def test_audio_aligned_with_sampled_frames(media_dir, name):
    fps = 20 if name == "mono48k.mp4" else 25
    ds = dataset(media_dir, [f"../media/{name},0.3,,x"], modalities=["video", "audio"], frames=8, stride=3)
    item = ds[0]
    first, last = item["frame_index"][0].item(), item["frame_index"][-1].item()
    t0, t1 = first / fps, (last + 1) / fps
    assert item["span"].tolist() == pytest.approx([t0, t1])
    assert item["audio"].shape == (round((t1 - t0) * 16000),) and item["audio_missing"] is False
    t_on, t_off = onset(item["audio"])
    assert abs(t0 + t_on - TONE_ON[0]) < 0.01 and abs(t0 + t_off - TONE_ON[1]) < 0.01


def test_audio_fixed_seconds_centred_and_side_wav(media_dir):
    ds = dataset(media_dir, ["../media/silent.mp4,0.0,1.2,../media/side.wav,x"], header="path,start,end,audio_path,label",
                 modalities=["video", "audio"], frames=4, stride=5, audio={"seconds": 1.0})
    item = ds[0]  # frames 7, 12, 17, 22 (centred in 30): span [0.28, 0.92), centre 0.6 -> audio [0.1, 1.1)
    assert item["frame_index"].tolist() == [7, 12, 17, 22]
    assert item["audio"].shape == (16000,) and item["audio_missing"] is False
    t_on, t_off = onset(item["audio"])
    assert abs(0.1 + t_on - WAV_ON[0]) < 0.01 and abs(0.1 + t_off - WAV_ON[1]) < 0.01
    assert ds.heads == {"label": "label"}  # audio_path is not a label column


def test_audio_only_items(media_dir):
    ds = dataset(media_dir, ["../media/speech.m4a,,,x"], modalities=["audio"], audio={"seconds": 1.0},
                 views={"clips": 3})
    waves = [ds[i]["audio"] for i in range(3)]  # windows [0, 1), [1, 2), [2, 3): tone only in the middle
    assert all(w.shape == (16000,) for w in waves)
    assert [round(w.abs().max().item(), 1) for w in waves] == [0.0, 0.5, 0.0]
    assert "video" not in ds[0] and ds[1]["span"].tolist() == pytest.approx([1.0, 2.0])
    fb = dataset(media_dir, ["../media/speech.m4a,,,x"], modalities=["audio"],
                 audio={"seconds": 1.0, "frontend": {"type": "kaldi_fbank", "target_length": 100}})
    assert fb[0]["audio"].shape == (100, 128)


def test_missing_audio_policies(media_dir):
    rows = ["../media/silent.mp4,,,a"]
    item = dataset(media_dir, rows, modalities=["video", "audio"], frames=4)[0]
    assert item["audio_missing"] is True and item["audio"].abs().max() == 0
    assert item["audio"].shape == (round((item["span"][1] - item["span"][0]).item() * 16000),)
    with pytest.raises(MissingAudioError, match="silent.mp4"):
        dataset(media_dir, rows, modalities=["video", "audio"], frames=4, audio={"missing": "error"})[0]
    skipped = dataset(media_dir, rows, modalities=["audio"], audio={"missing": "skip", "seconds": 1.0})[0]
    assert isinstance(skipped, Skipped) and skipped.path.endswith("silent.mp4")


def test_corrupt_files_are_skipped_and_named(media_dir):
    rows = ["../media/stereo44k.mp4,,,a", "../media/truncated.mp4,,,b", "../media/mono48k.mp4,,,a",
            "../media/garbage.mp4,,,b", "../media/nope.mp4,,,a"]
    ds = dataset(media_dir, rows, modalities=["video", "audio"], frames=4, train=True)
    batches = list(build_loader(ds, batch_size=5, num_workers=0))
    assert len(batches) == 1
    b = batches[0]
    assert b["batch_size"] == 2 and b["video"].shape == (2, 3, 4, SIZE, SIZE)
    assert [Path(p).name for p in b["path"]] == ["stereo44k.mp4", "mono48k.mp4"]
    assert b["labels"]["label"].tolist() == [0, 0] and b["audio_missing"].tolist() == [False, False]
    assert [Path(p).name for p, _ in b["skipped"]] == ["truncated.mp4", "garbage.mp4", "nope.mp4"]
    assert all(reason for _, reason in b["skipped"])
    empty = collate([ds[1], ds[3]])
    assert empty["batch_size"] == 0 and len(empty["skipped"]) == 2 and "video" not in empty
    assert empty["clip_id"] == [] and collate([None])["skipped"] == [("<unknown>", "the dataset returned None")]


def test_multi_view_count_clip_ids_and_crops(media_dir):
    ds = dataset(media_dir, ["../media/stereo44k.mp4,,,a", "../media/mono48k.mp4,,,b"], frames=4, stride=4,
                 views={"clips": 2, "crops": 3})
    assert len(ds) == 2 * 2 * 3
    ids = [ds[i]["clip_id"] for i in range(len(ds))]
    assert ids == ["0"] * 6 + ["1"] * 6
    firsts = [ds[i]["frame_index"][0].item() for i in range(6)]
    assert firsts == [0, 0, 0, 37, 37, 37]  # clip 0 at the start, clip 1 at the last start (50 - 13)
    ramp = torch.arange(80, dtype=torch.uint8).repeat(2, 3, 40, 1)  # (T, 3, 40, 80), value = column
    crops = [view_crop(ramp, 20, pos)[0, 0, 0].tolist() for pos in sampling.crop_positions(3)]
    # resized to 20x40, value ~ 2·column + 0.5: crops start at columns 0, 10, 20 (left, centre, right)
    assert [c[0] for c in crops] == pytest.approx([0.5, 20.5, 40.5], abs=1)
    tall = view_crop(ramp.transpose(-1, -2), 20, 0.0)
    assert tall.shape == (2, 3, 20, 20)
    train = dataset(media_dir, ["../media/stereo44k.mp4,,,a"], views={"clips": 2, "crops": 3}, train=True)
    assert len(train) == 1


def test_class_names_by_name_and_id(media_dir):
    lists = media_dir / "lists"
    (lists / "verbs.txt").write_text("open\nclose\ntake\n")
    (lists / "nouns.txt").write_text("door\n\ncup\n")
    ds = dataset(media_dir, ["../media/stereo44k.mp4,take,1,7", "../media/mono48k.mp4,2,cup,3",
                             "../media/mono48k.mp4,,door,"], header="path,verb,noun,other",
                 classes={"verb": "verbs.txt", "noun": "nouns.txt"}, heads={"verb": "verb", "noun": "noun"},
                 frames=2)
    assert ds.class_names("verb") == ["open", "close", "take"] and ds.num_classes("noun") == 2
    labels = [{h: int(v) for h, v in ds[i]["labels"].items()} for i in range(3)]
    assert labels == [{"verb": 2, "noun": 1}, {"verb": 2, "noun": 1}, {"verb": -1, "noun": 0}]
    inferred = dataset(media_dir, ["../media/stereo44k.mp4,take,7", "../media/mono48k.mp4,open,3"],
                       header="path,verb,other", name="n.csv", frames=2)
    assert inferred.class_names("verb") == ["open", "take"] and inferred.num_classes("other") == 8
    assert sorted(inferred.heads) == ["other", "verb"]
    with pytest.raises(ManifestError, match="unknown verb class 'jump'.*closest"):
        dataset(media_dir, ["../media/stereo44k.mp4,jump"], header="path,verb", classes={"verb": "verbs.txt"})
    with pytest.raises(ManifestError, match="outside"):
        dataset(media_dir, ["../media/stereo44k.mp4,5"], header="path,verb", classes={"verb": "verbs.txt"})
    with pytest.raises(KeyError):
        ds.class_names("action")


def test_csv_and_jsonl_manifests_relative_paths(media_dir):
    sub = media_dir / "lists" / "deep"
    sub.mkdir(exist_ok=True)
    (sub / "c.txt").write_text("a\nb\n")
    csv_path = write_csv(sub / "m.csv", "id,path,start,end,label", ["x1,../../media/stereo44k.mp4,00:00.4,0:01.2,b"])
    jsonl = sub / "m.jsonl"
    jsonl.write_text(json.dumps({"id": "x1", "path": "../../media/stereo44k.mp4", "start": 0.4, "end": 1.2,
                                 "label": 1}) + "\n\n")
    a = ManifestDataset(path=csv_path, classes={"label": "c.txt"}, frames=4, size=SIZE)[0]
    b = ManifestDataset(path=jsonl, classes={"label": "c.txt"}, frames=4, size=SIZE)[0]
    assert a["clip_id"] == b["clip_id"] == "x1" and a["path"] == b["path"]
    assert torch.equal(a["video"], b["video"]) and int(a["labels"]["label"]) == int(b["labels"]["label"]) == 1
    rooted = write_csv(sub / "r.csv", "path,label", ["stereo44k.mp4,0"])
    m = Manifest(rooted, root=media_dir / "media")
    assert Path(m.items[0].path) == media_dir / "media" / "stereo44k.mp4"
    assert parse_time("01:02:03.5") == 3723.5 and parse_time("") is None
    with pytest.raises(ManifestError, match="no 'path' column"):
        Manifest(write_csv(sub / "bad.csv", "file,label", ["x.mp4,0"]))
    with pytest.raises(ManifestError, match="after start"):
        Manifest(write_csv(sub / "bad2.csv", "path,start,end", ["x.mp4,2,1"]))


def test_train_augmentation_shapes_and_seeded_items(media_dir):
    rows = ["../media/stereo44k.mp4,,,a", "../media/six16k.mp4,,,b"]
    opts = dict(frames=4, train=True, color_jitter=0.4, randaugment={"n": 2, "m": 9}, random_resized_crop=[0.3, 1.0],
                mean="clip")
    ds = dataset(media_dir, rows, seed=3, **opts)
    x, y = ds[0], ds[0]
    assert x["video"].shape == (3, 4, SIZE, SIZE)
    assert torch.equal(x["video"], y["video"]) and torch.equal(x["frame_index"], y["frame_index"])
    videos = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        videos.append(ds[0]["frame_index"].tolist() + ds[0]["video"].flatten()[:50].tolist())
    assert len({tuple(v) for v in videos}) > 1  # the epoch changes the draw
    with pytest.raises(ValueError, match="unknown audio option"):
        dataset(media_dir, rows, audio={"rate": 16000})
    with pytest.raises(ValueError, match="unknown normalisation"):
        dataset(media_dir, rows, mean="imagenett")


def test_loaders_with_same_seed_and_two_workers_agree(media_dir):
    rows = [f"../media/{n},,,{i % 2}" for i, n in enumerate(["stereo44k.mp4", "mono48k.mp4", "six16k.mp4",
                                                             "silent.mp4", "truncated.mp4", "mpeg4.mkv"])]
    ds = dataset(media_dir, rows, modalities=["video", "audio"], frames=4, train=True, color_jitter=0.4,
                 randaugment={"n": 1, "m": 9})

    def run(seed):
        out = []
        for b in build_loader(ds, batch_size=2, shuffle=True, num_workers=2, seed=seed):
            out.append((b["path"], b["skipped"] and b["skipped"][0][0], b.get("video"), b.get("audio")))
        return out

    first, second, other = run(7), run(7), run(8)
    assert [o[:2] for o in first] == [o[:2] for o in second]
    for a, b in zip(first, second):
        assert (a[2] is None and b[2] is None) or (torch.equal(a[2], b[2]) and torch.equal(a[3], b[3]))
    assert sum(len(o[0]) for o in first) == 5 and sum(bool(o[1]) for o in first) == 1
    assert [o[0] for o in first] != [o[0] for o in other] or any(
        a[2] is not None and not torch.equal(a[2], b[2]) for a, b in zip(first, other))
    seed_worker(0)  # callable outside a worker too


def test_registered_and_bad_options(media_dir):
    assert DATASETS.get("manifest") is ManifestDataset
    rows = ["../media/stereo44k.mp4,,,a"]
    with pytest.raises(ValueError, match="modalities"):
        dataset(media_dir, rows, modalities=["depth"])
    with pytest.raises(ValueError, match="sampling"):
        dataset(media_dir, rows, sampling="tsn")
    with pytest.raises(ValueError, match="missing"):
        dataset(media_dir, rows, audio={"missing": "ignore"})


def test_load_inputs_for_predict(media_dir):
    from fusionkit.data.load_inputs import load_inputs

    recipe = {"data": {"val": {"type": "manifest", "path": "x.csv", "modalities": ["video", "audio"], "frames": 4,
                               "size": SIZE, "views": {"clips": 2, "crops": 3}, "audio": {"seconds": 1.0}}}}
    out = load_inputs(media_dir / "media" / "stereo44k.mp4", recipe)
    assert out["video"].shape == (6, 3, 4, SIZE, SIZE) and out["audio"].shape == (6, 16000)
    out = load_inputs(media_dir / "media" / "stereo44k.mp4", {"inputs": {"video": [3, 8, 24, 24]}})
    assert set(out) == {"video"} and out["video"].shape == (1, 3, 8, 24, 24)
    with pytest.raises(decode.DecodeError):
        load_inputs(media_dir / "media" / "garbage.mp4", recipe)
    import fusionkit.data as data

    assert callable(data.collate) and callable(data.load_inputs) and callable(data.build_loader)


def test_decoded_cache_decodes_each_clip_once_and_keeps_its_arrays_intact(media_dir, monkeypatch):
    from fusionkit.data import decode, memo

    memo.clear()
    calls = {"frames": 0, "audio": 0}
    real_frames, real_audio = decode.read_frames, decode.read_audio

    def count(kind, fn):
        def wrapped(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(decode, "read_frames", count("frames", real_frames))
    monkeypatch.setattr(decode, "read_audio", count("audio", real_audio))
    rows = ["../media/stereo44k.mp4,0.0,1.0,0"]
    plain = dataset(media_dir, rows, name="memo.csv", frames=4, stride=2, modalities=["video", "audio"])
    cached = dataset(media_dir, rows, name="memo.csv", frames=4, stride=2, modalities=["video", "audio"],
                     decoded_cache_gb=0.1)
    first = cached[0]
    first["video"].add_(100.0)   # callers may change their items in place: the memory must not see it
    first["audio"].zero_()
    second, third, ref = cached[0], cached[0], plain[0]
    assert calls == {"frames": 2, "audio": 2}  # one decode for the cached dataset, one for the plain one
    for item in (second, third):
        torch.testing.assert_close(item["video"], ref["video"], rtol=0, atol=0)
        torch.testing.assert_close(item["audio"], ref["audio"], rtol=0, atol=0)
    memo.clear()


def test_decoded_cache_dir_is_shared_by_processes_and_survives_bad_entries(media_dir, tmp_path, monkeypatch, caplog):
    from fusionkit.data import decode, memo

    rows = ["../media/stereo44k.mp4,0.0,1.0,0", "../media/mono48k.mp4,0.0,1.0,1"]
    folder = tmp_path / "decoded"
    options = dict(name="disk.csv", frames=4, stride=2, modalities=["video", "audio"])
    ref = [dataset(media_dir, rows, **options)[i] for i in range(2)]
    memo.clear()
    writer = dataset(media_dir, rows, decoded_cache_dir=folder, **options)
    assert writer.decode_all(shard=1, shards=2) == 1 and writer.decode_all(shard=0, shards=2) == 1
    entries = sorted(folder.rglob("*.pkl"))
    assert len(entries) == 6  # probe, frames and audio of each clip; no temporary file left
    assert not list(folder.rglob(".tmp-*"))
    memo.clear()  # a new process: nothing in memory, everything on disk

    def refuse(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(decode, "read_frames", refuse)
    monkeypatch.setattr(decode, "read_audio", refuse)
    monkeypatch.setattr(decode, "probe", refuse)
    reader = dataset(media_dir, rows, decoded_cache_dir=folder, **options)
    for i in range(2):
        got = reader[i]
        torch.testing.assert_close(got["video"], ref[i]["video"], rtol=0, atol=0)
        torch.testing.assert_close(got["audio"], ref[i]["audio"], rtol=0, atol=0)
    monkeypatch.undo()
    memo.clear()
    entries[0].write_bytes(b"not a pickle")  # a truncated / foreign entry: decoded again and rewritten
    with caplog.at_level("WARNING", logger="fusionkit.data.memo"):
        items = [dataset(media_dir, rows, decoded_cache_dir=folder, **options)[i] for i in range(2)]
    assert [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()] != []
    assert str(entries[0]) in caplog.text
    for got, want in zip(items, ref):
        torch.testing.assert_close(got["audio"], want["audio"], rtol=0, atol=0)
    assert entries[0].read_bytes() != b"not a pickle"
    memo.clear()


def test_decoded_cache_dir_that_cannot_be_written_warns_once_and_decodes(media_dir, tmp_path, caplog):
    from fusionkit.data import memo

    memo.clear()
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    rows = ["../media/stereo44k.mp4,0.0,1.0,0", "../media/mono48k.mp4,0.0,1.0,1"]
    options = dict(name="ro.csv", frames=4, stride=2, modalities=["video", "audio"])
    with caplog.at_level("WARNING", logger="fusionkit.data.memo"):
        items = [dataset(media_dir, rows, decoded_cache_dir=blocker / "decoded", **options)[i] for i in range(2)]
    assert len([r for r in caplog.records if "cannot write" in r.getMessage()]) == 1
    ref = dataset(media_dir, rows, **options)[1]
    torch.testing.assert_close(items[1]["video"], ref["video"], rtol=0, atol=0)
    memo.clear()

"""``fusionkit eval --corrupt``: each corruption's exact effect on synthetic tensors, deterministic draws,
one-line errors for bad SPECs, and clean + corrupted evaluation side by side on real media files
(decoded once per clip for every condition)."""

from __future__ import annotations

import csv
import json
import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from media import tone, write_video  # noqa: E402

import fusionkit  # noqa: F401 - registers the built-ins
from fusionkit.cli import main
from fusionkit.data import decode, memo
from fusionkit.data.corrupt import CORRUPTIONS, parse, parse_all, pink
from fusionkit.data.dataset import ManifestDataset
from fusionkit.data.transforms import normalize
from fusionkit.engine.checkpoint import model_meta, model_tensors, save_tensors
from fusionkit.engine.evaluate import run_robustness
from fusionkit.recipes import build_from_config, load_recipe

KEY = ("clip-7", 0)


def snr_db(clean: torch.Tensor, noisy: torch.Tensor) -> float:
    return 10 * math.log10(clean.double().pow(2).mean() / (noisy.double() - clean.double()).pow(2).mean())


def wave(n: int = 16000) -> torch.Tensor:
    """``(n,)`` float32 with no zero sample: a tone on an offset."""
    return 0.3 + 0.5 * torch.sin(torch.arange(n) * 0.07)


def frames(t: int = 8, h: int = 32, w: int = 48) -> torch.Tensor:
    """uint8 ``(T, 3, H, W)``: frame ``i`` is a gradient plus ``10 · i`` (no zero pixel)."""
    ramp = torch.linspace(20, 200, w).expand(h, w)
    return torch.stack([(ramp + 10 * i).clamp(1, 255).to(torch.uint8).expand(3, h, w) for i in range(t)])


# -- each corruption on synthetic tensors ----------------------------------------------------------

@pytest.mark.parametrize("name", ["gaussian_noise", "pink_noise"])
@pytest.mark.parametrize("snr", [-5.0, 0.0, 10.0, 30.0])
def test_noise_has_the_exact_snr(name, snr):
    x = wave()
    y = parse(f"{name}:snr={snr:g}").audio(x, 16000, KEY)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert snr_db(x, y) == pytest.approx(snr, abs=0.1)


def test_pink_noise_falls_as_one_over_f_and_silence_stays_silent():
    power = torch.fft.rfft(pink(2**16, torch.Generator().manual_seed(0))).abs().pow(2)
    f = torch.arange(power.shape[0], dtype=torch.float64)
    bands = [power[(f >= lo) & (f < 2 * lo)].mean() for lo in (64.0, 256.0, 1024.0, 4096.0)]
    slopes = [math.log(b / a) / math.log(4) for a, b in zip(bands, bands[1:])]  # power ∝ f^slope
    assert all(-1.15 < s < -0.85 for s in slopes), slopes
    assert power[0] < 1e-9  # no DC
    silence = torch.zeros(1600)
    assert torch.equal(parse("gaussian_noise:snr=0").audio(silence, 16000, KEY), silence)


@pytest.mark.parametrize("spec, run", [("audio_drop:0.2", 1), ("audio_drop:0.2,segment=0.05", 800)])
def test_audio_drop_zeroes_the_exact_fraction(spec, run):
    x = wave(16001)
    y = parse(spec).audio(x, 16000, KEY)
    dropped = y == 0
    assert int(dropped.sum()) == round(0.2 * 16001)
    assert torch.equal(y[~dropped], x[~dropped])
    edges = torch.nonzero(torch.diff(dropped.int(), prepend=torch.zeros(1, dtype=torch.int32))).flatten()
    starts = edges[::2]  # every gap starts on the grid of `run` samples
    assert bool((starts % run == 0).all())
    if run > 1:
        assert len(starts) <= math.ceil(round(0.2 * 16001) / run) + 1


def test_frame_drop_repeats_the_previous_kept_frame():
    x = frames(8)
    y = parse("frame_drop:0.5").video(x, KEY)
    source = [int(round((f.float().mean() - x[0].float().mean()).item() / 10)) for f in y]  # frame i = base + 10 i
    kept = [i for i, s in enumerate(source) if s == i]
    assert source[0] == 0 and len(kept) == 4  # round(0.5 · 8) dropped, never the first
    assert source == [max(k for k in kept if k <= i) for i in range(8)]
    assert torch.equal(y, x[source])
    assert torch.equal(parse("frame_drop:0").video(x, KEY), x)


def test_occlusion_is_one_black_square_of_the_area_in_every_frame():
    x = frames(4, 32, 48)
    y = parse("occlusion:0.25").video(x, KEY)
    side = round(math.sqrt(0.25 * 32 * 48))  # 20
    black = y == 0
    assert bool((black == black[0, 0]).all())  # the same square in every frame and channel
    rows, cols = torch.nonzero(black[0, 0], as_tuple=True)
    assert int(black[0, 0].sum()) == side * side
    assert int(rows.max() - rows.min()) + 1 == side and int(cols.max() - cols.min()) + 1 == side
    assert torch.equal(y[~black], x[~black])


def test_jpeg_changes_pixels_but_keeps_shape_and_dtype():
    x = frames(2) + torch.randint(0, 40, (2, 3, 32, 48), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    errors = {}
    for quality in (10, 95):
        y = parse(f"jpeg:quality={quality}").video(x, KEY)
        assert y.shape == x.shape and y.dtype == torch.uint8
        errors[quality] = (y.float() - x.float()).abs().mean().item()
    assert 0 < errors[95] < errors[10] < 30, errors


def test_blur_keeps_a_constant_and_spreads_an_edge():
    flat = torch.full((3, 3, 16, 16), 77, dtype=torch.uint8)
    assert torch.equal(parse("blur:sigma=1.5").video(flat, KEY), flat)
    assert torch.equal(parse("blur:sigma=40").video(flat, KEY), flat)  # radius capped by the frame
    edge = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    edge[..., 8:] = 200
    row = parse("blur:sigma=1.5").video(edge, KEY)[0, 0, 0]
    assert 0 < row[7] < 100 < row[8] < 200 and row[0] == 0 and row[-1] == 200


def test_audio_shift_is_uniform_in_the_paper_range_or_fixed():
    shifts = [parse("audio_shift:2").audio_shift(("clip", i)) for i in range(400)]
    assert all(-2 <= s <= 2 for s in shifts) and min(shifts) < -1.8 and max(shifts) > 1.8
    assert abs(sum(shifts) / len(shifts)) < 0.2
    assert parse("audio_shift:seconds=-0.5,fixed=1").audio_shift(KEY) == -0.5
    assert parse("blur").audio_shift(KEY) == 0.0


def test_draws_depend_on_clip_and_seed_only():
    x, v = wave(), frames(8)
    for spec in ("audio_drop:0.2", "gaussian_noise:snr=0", "pink_noise:snr=0"):
        c = parse(spec)
        again = pickle.loads(pickle.dumps(c))  # as a DataLoader worker gets it
        assert torch.equal(c.audio(x, 16000, KEY), again.audio(x, 16000, KEY))
        assert not torch.equal(c.audio(x, 16000, KEY), c.audio(x, 16000, ("clip-8", 0)))
        assert not torch.equal(c.audio(x, 16000, KEY), parse(f"{spec},seed=1").audio(x, 16000, KEY))
    for spec in ("frame_drop:0.5", "occlusion:0.1"):
        c = parse(spec)
        assert torch.equal(c.video(v, KEY), c.video(v, KEY))
        assert any(not torch.equal(c.video(v, KEY), c.video(v, ("clip", i))) for i in range(5))
    assert parse("audio_shift:2").audio_shift(KEY) == parse("audio_shift:2").audio_shift(KEY)


def test_a_corruption_changes_only_its_own_modality():
    x, v = wave(), frames(4)
    for name, (acts_on, _, _) in CORRUPTIONS.items():
        c = parse(name)
        assert torch.equal(c.video(v, KEY), v) == (acts_on != "video"), name
        assert torch.equal(c.audio(x, 16000, KEY), x) == (acts_on != "audio"), name


def test_spec_syntax():
    assert parse("blur").params == {"sigma": 1.5}
    assert parse(" blur:2.5 ").params == {"sigma": 2.5} and parse("blur:2.5").spec == "blur:2.5"
    c = parse("audio_drop:0.3,segment=0.1,seed=4")
    assert c.params == {"fraction": 0.3, "segment": 0.1} and c.seed == 4
    assert parse("jpeg:quality=20").params == {"quality": 20}
    with pytest.raises(ValueError, match="given twice"):
        parse_all(["blur", "blur"])


# -- the command line -----------------------------------------------------------------------------

def one_error(capsys, argv: list[str], *names: str) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Building a model fails the test: errors must come before."""
    def fail(*args, **kwargs):
        raise AssertionError("a model was built")
    monkeypatch.setattr("fusionkit.recipes.build_from_config", fail)


@pytest.mark.parametrize("spec, names", [
    ("blurr:2", ["unknown corruption 'blurr'"]),
    ("jpeg:quality=0", ["quality must be an integer in [1, 100], got '0'"]),
    ("gaussian_noise:db=3", ["gaussian_noise takes snr, seed", "'db=3'"]),
    ("audio_drop:1.5", ["fraction must be a number in [0, 1]"]),
    ("occlusion:area=big", ["area must be a number in (0, 1]"]),
])
def test_bad_spec_is_one_line_listing_every_valid_spec(capsys, no_model, tmp_path, spec, names):
    valid = [f"{name}:{next(iter(params))}=" for name, (_, _, params) in CORRUPTIONS.items()]
    one_error(capsys, ["eval", "tiny", "--checkpoint", str(tmp_path / "none.safetensors"), "--corrupt", "blur",
                       "--corrupt", spec, "--json"], f"--corrupt {spec!r}", *names, *valid, "seed=0")


def test_a_set_without_decoded_media_is_refused_before_the_model(capsys, no_model, tmp_path):
    one_error(capsys, ["eval", "tiny", "--checkpoint", str(tmp_path / "none.safetensors"), "--corrupt", "blur"],
              "data.val (SyntheticDataset) cannot be corrupted")


# -- real media: the dataset hook, shared decoding, the command --------------------------------------

@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> dict:
    """recipes/tiny.yaml on three 1 s H.264 + AAC clips (8 frames of noise at 8 fps, a tone in [0.5, 1) s)."""
    root = tmp_path_factory.mktemp("media")
    rows = []
    for i in range(3):
        video = np.random.default_rng(i).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
        write_video(root / f"clip{i}.mp4", video, fps=8, audio=tone(1.0, 16000, 1, on=(0.5, 1.0)), sample_rate=16000)
        rows.append({"path": f"clip{i}.mp4", "verb": i, "noun": i})
    with (root / "val.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "verb", "noun"])
        writer.writeheader()
        writer.writerows(rows)
    cfg = load_recipe("tiny")
    cfg["data"] = {"val": {"type": "manifest", "path": str(root / "val.csv"), "frames": 4, "sampling": "segment",
                           "size": 32, "modalities": ["video", "audio"], "audio": {"seconds": 0.1}}}
    return cfg


@pytest.fixture(scope="module")
def checkpoint(recipe, tmp_path_factory) -> str:
    """What `fusionkit train` writes for an untrained model (random heads), without training it."""
    torch.manual_seed(0)
    model = build_from_config(recipe)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_tensors(path, model_tensors(model), {"fusionkit": model_meta(model, recipe, 0, True)})
    return str(path)


@pytest.fixture
def fresh_memo():
    memo.clear()
    yield
    memo.clear()


def dataset(recipe: dict, spec: str | None = None) -> ManifestDataset:
    ds = ManifestDataset(**{k: v for k, v in recipe["data"]["val"].items() if k != "type"})
    ds.corruption = parse(spec) if spec else None
    return ds


def test_audio_shift_reads_the_shifted_window_from_the_file(recipe):
    clean, shifted = dataset(recipe)[0], dataset(recipe, "audio_shift:seconds=-0.3,fixed=1")[0]
    t0, t1 = clean["span"].tolist()  # video and audio are centred on the same span
    centre = (t0 + t1) / 2
    path = clean["path"]
    assert torch.equal(clean["audio"], decode.read_audio(path, centre - 0.05, centre + 0.05, 16000,
                                                         origin=decode.probe(path).origin))
    assert torch.equal(shifted["audio"], decode.read_audio(path, centre - 0.05 - 0.3, centre + 0.05 - 0.3, 16000,
                                                           origin=decode.probe(path).origin))
    assert torch.equal(shifted["video"], clean["video"])
    early = dataset(recipe, "audio_shift:seconds=-5,fixed=1")[0]["audio"]
    assert early.shape == clean["audio"].shape and not early.any()  # before the file: zeros, not a rolled wave


def test_video_corruption_acts_on_the_uint8_view_before_normalisation(recipe):
    ds = dataset(recipe, "occlusion:1")
    item = ds[1]
    black = normalize(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), ds.mean, ds.std)
    assert torch.equal(item["video"], black)
    assert torch.equal(item["audio"], dataset(recipe)[1]["audio"])


def test_conditions_share_one_decoding_per_clip(recipe, checkpoint, fresh_memo, monkeypatch):
    calls = {"frames": 0, "audio": 0}
    read_frames, read_audio = decode.read_frames, decode.read_audio

    def count(kind, fn):
        def wrapped(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(decode, "read_frames", count("frames", read_frames))
    monkeypatch.setattr(decode, "read_audio", count("audio", read_audio))
    specs = ["gaussian_noise:snr=0", "jpeg:quality=20", "frame_drop:0.5", "audio_shift:seconds=0.5,fixed=1"]
    results = run_robustness(recipe, checkpoint, specs, progress=False)
    assert list(results) == ["clean", *specs]
    assert calls == {"frames": 3, "audio": 3 * 2}  # 5 conditions; the shifted window is one more read per clip
    assert all(r["num_samples"] == 3 for r in results.values())
    for spec in ("gaussian_noise:snr=0", "audio_shift:seconds=0.5,fixed=1"):  # tiny has no audio expert
        assert results[spec] == results["clean"]


def test_loader_workers_draw_the_same_corruption(recipe):
    for spec in ("occlusion:0.3", "pink_noise:snr=-10", "audio_shift:1"):
        ds = dataset(recipe, spec)
        inline = [ds[i] for i in range(len(ds))]
        workers = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
        for a, b in zip(inline, workers, strict=True):
            assert torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"]), spec


def test_eval_corrupt_json_and_table(recipe, checkpoint, fresh_memo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the table on one line per condition
    path = tmp_path / "tiny_files.yaml"
    OmegaConf.save(OmegaConf.create(recipe), path)
    capsys.readouterr()
    argv = ["eval", str(path), "--checkpoint", checkpoint, "--corrupt", "gaussian_noise:snr=0"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["clean", "gaussian_noise:snr=0"]
    assert {"verb/top1", "noun/top1", "action/top1", "num_samples"} <= set(out["clean"])
    assert out["gaussian_noise:snr=0"] == out["clean"]
    assert main([*argv, "--corrupt", "occlusion:1", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "Robustness" in table and "condition" in table and "occlusion:1" in table and "(+0)" in table

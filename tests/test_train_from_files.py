"""End to end on real media files: a manifest of H.264 + AAC clips written with PyAV (one corrupt),
the tiny recipe trains from it and its loss goes down, eval and predict run on the checkpoint."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from media import tone, write_corrupt, write_video  # noqa: E402

import fusionkit  # noqa: F401 - registers the built-ins
from fusionkit.cli import main as engine_main
from fusionkit.engine.evaluate import run_eval
from fusionkit.engine.trainer import train
from fusionkit.recipes import load_recipe

CLASSES = 4  # verb classes of recipes/tiny.yaml; the noun head (5 classes) gets the same label
VERBS = ["open", "close", "take", "put"]


def clip(label: int, seed: int) -> np.ndarray:
    """8 frames of 32x32: brightness encodes the label, with per-clip noise."""
    rng = np.random.default_rng(seed)
    base = 30 + 60 * label
    frames = base + rng.integers(-10, 10, size=(8, 32, 32, 3))
    return np.clip(frames, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("files")
    rows = []
    for i in range(16):
        label = i % CLASSES
        audio = tone(1.0, 44100, 2, on=(0.0, 1.0))
        write_video(root / f"clip{i}.mp4", clip(label, i), fps=8, audio=audio, sample_rate=44100)
        rows.append({"path": f"clip{i}.mp4", "verb": label, "noun": label})
    write_corrupt(root / "broken.mp4", root / "clip0.mp4")
    (root / "verbs.txt").write_text("\n".join(VERBS) + "\n")
    rows.append({"path": "broken.mp4", "verb": 0, "noun": 0})
    path = root / "train.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "verb", "noun"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def recipe_file(manifest: Path, folder: Path) -> str:
    """recipes/tiny.yaml with its synthetic data replaced by the manifest of real files."""
    recipe = load_recipe("tiny")
    data = {"type": "manifest", "path": str(manifest), "frames": 4, "sampling": "segment", "size": 32,
            "flip": False, "random_resized_crop": False, "classes": {"verb": "verbs.txt"}}
    recipe["data"] = {"train": {**data, "train": True}, "val": data}
    recipe["train"].update(batch_size=8, epochs=4, eval_every=4, base_lr=2.0, warmup_epochs=0, log_every=1000)
    path = folder / "tiny_files.yaml"
    OmegaConf.save(OmegaConf.create(recipe), path)
    return str(path)


def test_train_eval_predict_from_real_files(manifest, tmp_path, capsys):
    recipe = recipe_file(manifest, tmp_path)
    result = train(recipe, output_dir=tmp_path / "run", progress=False)
    assert result.status == "finished"
    assert result.skipped_items >= 1  # the corrupt file, named and counted, never fatal
    losses = [x for x in result.losses if math.isfinite(x)]
    assert len(losses) >= 6 and np.mean(losses[-2:]) < np.mean(losses[:2])

    metrics = run_eval(recipe, str(result.checkpoint), progress=False)
    assert metrics["num_samples"] == 16 and metrics["skipped"] == 1
    assert {"verb/top1", "noun/top1", "action/top1"} <= set(metrics)

    capsys.readouterr()
    code = engine_main(["predict", recipe, "--video", str(manifest.parent / "clip3.mp4"),
                        "--checkpoint", str(result.checkpoint), "--json"])
    assert code == 0
    preds = json.loads(capsys.readouterr().out)["predictions"]
    assert len(preds["verb"]) == CLASSES and abs(sum(p["prob"] for p in preds["verb"]) - 1) < 1e-5
    assert sorted(p["name"] for p in preds["verb"]) == sorted(VERBS)  # names from the manifest's class file
    assert engine_main(["predict", recipe, "--video", str(manifest.parent / "broken.mp4")]) != 0

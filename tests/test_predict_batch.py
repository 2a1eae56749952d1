"""``fusionkit predict`` on a folder or a manifest: one row per decodable clip (CSV or JSON Lines),
batched probabilities equal to one clip at a time, an undecodable file skipped and named in one
warning line, and the mistakes that end in one error line before anything is decoded."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from media import tone, write_corrupt, write_video  # noqa: E402

import fusionkit  # noqa: F401 - registers the built-ins
from fusionkit.cli import main
from fusionkit.engine.predict import run_predict

GOOD = ["clip0.mp4", "clip1.mp4", "clip2.mp4", "clip3.mp4"]  # clip2 has no audio track (silence)
VIEWS = "data.test={type: manifest, path: unused.csv, frames: 4, size: 32, modalities: [video, audio], " \
        "views: {clips: 2, crops: 3}, audio: {seconds: 0.1}}"  # 6 test views per clip


def noise(frames: int, seed: int) -> np.ndarray:
    """``(frames, 48, 64, 3)`` uint8 noise: every clip, time position and crop looks different."""
    return np.random.default_rng(seed).integers(0, 256, (frames, 48, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    for i, name in enumerate(GOOD):
        audio = None if i == 2 else tone(1.0 + i / 8, 16000, 1, on=(0.0, 0.5))
        write_video(root / name, noise(12 + 2 * i, i), fps=8, audio=audio, sample_rate=16000)
    write_corrupt(root / "broken.mp4", root / "clip0.mp4")
    return root


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_folder_to_csv_has_a_row_per_good_file_and_names_the_skipped_one(folder, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    code, stdout, err = run(capsys, ["predict", "tiny", "--video", str(folder), "--out", str(out),
                                     "--batch-size", "2", "--no-progress"])
    assert code == 0, err
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["path"]).name for r in rows] == GOOD
    assert {"verb/top1/class", "verb/top4/prob", "noun/top5/name"} <= set(rows[0]) and "verb/top5/class" not in rows[0]
    assert all(abs(sum(float(r[f"noun/top{k}/prob"]) for k in range(1, 6)) - 1) < 1e-5 for r in rows)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: skipped 1 of 5 files: broken.mp4 ("), err
    assert f"wrote 4 predictions to {out}" in stdout
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside it


@pytest.mark.parametrize("overrides", [[], [VIEWS]], ids=["one view", "six views"])
def test_batches_give_the_probabilities_of_one_clip_at_a_time(overrides, folder, tmp_path):
    out = tmp_path / "preds.jsonl"
    assert main(["predict", "tiny", "--video", str(folder), "--out", str(out), "--batch-size", "3",
                 "--no-progress", *overrides]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["path"]).name for r in rows] == GOOD
    batched = [{(h, p["class"]): p["prob"] for h, ranks in r["predictions"].items() for p in ranks} for r in rows]
    alone = [{(h, p["class"]): p["prob"] for h, ranks in run_predict("tiny", r["path"], overrides=overrides)
              ["predictions"].items() for p in ranks} for r in rows]
    for got, want in zip(batched, alone):
        assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-5 for k in want), (got, want)
    spread = [max(abs(a[k] - b[k]) for k in a) for i, a in enumerate(alone) for b in alone[i + 1:]]
    assert min(spread) > 1e-4  # clips differ by more than the tolerance: a mixed-up batch would fail


def test_manifest_labels_in_json_lines_on_stdout(folder, tmp_path, capsys):
    manifest = tmp_path / "test.csv"
    manifest.write_text("path,verb\n" + "".join(f"{folder / n},{label}\n" for n, label in
                                                 zip(GOOD, ["open", "close", "", "open"])))
    code, stdout, err = run(capsys, ["predict", "tiny", "--manifest", str(manifest), "--json", "--topk", "2"])
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.splitlines()]  # nothing but the rows on stdout: no bar
    assert [r["labels"] for r in rows] == [{"verb": "open"}, {"verb": "close"}, {"verb": None}, {"verb": "open"}]
    assert [r["id"] for r in rows] == ["0", "1", "2", "3"]
    assert all(len(r["predictions"]["verb"]) == 2 for r in rows)


def test_progress_bar_on_a_terminal(folder, tmp_path):
    from rich.console import Console

    from fusionkit.engine.predict_batch import run_predict_batch

    shown = io.StringIO()
    result = run_predict_batch("tiny", video=folder, out=tmp_path / "p.csv", batch_size=2, progress=True,
                               console=Console(file=shown, force_terminal=True, width=120))
    assert len(result.rows) == 4 and "predict tiny" in shown.getvalue() and "3/3" in shown.getvalue()


def test_overwrite_replaces_an_existing_file(folder, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    out.write_text("another run\n")
    assert main(["predict", "tiny", "--video", str(folder / "clip1.mp4"), "--out", str(out), "--overwrite",
                 "--no-progress"]) == 0
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == [str(folder / "clip1.mp4")]


@pytest.mark.parametrize("case", ["empty folder", "missing manifest", "unknown suffix", "existing out",
                                  "folder without --out"])
def test_mistakes_end_in_one_line_before_decoding(case, folder, tmp_path, capsys, monkeypatch):
    from fusionkit.data import decode

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the mistake was reported")

    monkeypatch.setattr(decode, "probe", no_decoding)
    (tmp_path / "empty").mkdir()
    existing = tmp_path / "old.csv"
    existing.write_text("another run\n")
    argv, names = {
        "empty folder": (["--video", str(tmp_path / "empty"), "--out", str(tmp_path / "p.csv")],
                         [str(tmp_path / "empty"), "without files"]),
        "missing manifest": (["--manifest", str(tmp_path / "none.csv"), "--json"], ["none.csv", "not found"]),
        "unknown suffix": (["--video", str(folder), "--out", str(tmp_path / "p.txt")], ["p.txt", ".csv or .jsonl"]),
        "existing out": (["--video", str(folder), "--out", str(existing)], [str(existing), "--overwrite"]),
        "folder without --out": (["--video", str(folder)], [str(folder), "--out FILE", "--json"]),
    }[case]
    code, stdout, err = run(capsys, ["predict", "tiny", *argv])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err and not stdout, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(n in lines[0] for n in names), lines
    assert existing.read_text() == "another run\n" and not (tmp_path / "p.csv").exists()


def test_every_file_undecodable_is_an_error(folder, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    write_corrupt(bad / "a.mp4", folder / "clip0.mp4")
    (bad / "notes.txt").write_text("not media\n")
    code, _, err = run(capsys, ["predict", "tiny", "--video", str(bad), "--out", str(tmp_path / "p.csv")])
    assert code == 2 and "every one of the 2 files failed to decode" in err
    assert not (tmp_path / "p.csv").exists()

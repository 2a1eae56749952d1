"""fusionkit inspect: attention recorded through the entry point, entropy per direction and layer."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from media import write_video  # noqa: E402

import fusionkit  # noqa: E402
from fusionkit.attention import AttentionRecord, recording  # noqa: E402
from fusionkit.cli import main  # noqa: E402
from fusionkit.engine.inspection import row_entropy, summarise  # noqa: E402


def randomised_tiny():
    torch.manual_seed(0)
    model = fusionkit.build("tiny").eval()
    with torch.no_grad():  # zero-initialised up-projections would hide the operators' output
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    return model


def test_recording_keeps_outputs_and_labels_every_direction_and_step():
    model = randomised_tiny()
    x = {"video": torch.randn(2, 3, 4, 32, 32), "audio": torch.randn(2, 1600)}
    with torch.no_grad():
        plain = model(x)
        with recording() as records:
            recorded = model(x)
        again = model(x)
    assert [r.label for r in records] == ["bca/0/t2s", "bca/0/s2t", "bca/1/t2s", "bca/1/s2t"]
    for k in plain:
        torch.testing.assert_close(recorded[k], plain[k], atol=1e-5, rtol=1e-5)
        assert torch.equal(again[k], plain[k])  # recording is off again
    t2s = records[0].weights  # (B * 16 positions, heads, 2 frames of the tubelet, 2 tubelet tokens)
    assert t2s.shape == (32, 2, 2, 2)
    torch.testing.assert_close(t2s.sum(-1), torch.ones(32, 2, 2))


def test_entropy_is_the_brute_force_value():
    w = torch.tensor([[[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]])
    ent, logk = row_entropy(w)
    torch.testing.assert_close(ent, torch.tensor([[np.log(4), 0.0, np.log(2)]], dtype=torch.float32))
    torch.testing.assert_close(logk, torch.tensor([[np.log(4), 0.0, np.log(2)]], dtype=torch.float32))
    out = summarise([AttentionRecord("bca/3/t2s", w[None]), AttentionRecord("unlabelled", w[None])])
    assert list(out) == ["bca.t2s"] and out["bca.t2s"]["steps"] == [3]
    assert out["bca.t2s"]["normalised"] == pytest.approx([1.0])  # the one-key row has no choice: left out
    assert out["bca.t2s"]["entropy"] == pytest.approx([(np.log(4) + np.log(2)) / 3])


def test_inspect_command_writes_entropy_json_and_png(tmp_path, capsys):
    frames = np.random.default_rng(0).integers(0, 256, (8, 48, 48, 3), dtype=np.uint8)
    clip = write_video(tmp_path / "clip.mp4", frames)
    assert main(["inspect", "tiny", "--video", str(clip), "--out", str(tmp_path / "out")]) == 0
    got = json.loads((tmp_path / "out" / "entropy.json").read_text())
    assert set(got["directions"]) == {"bca.t2s", "bca.s2t"}
    for d in got["directions"].values():
        assert d["steps"] == [0, 1] and all(0.0 <= v <= 1.0 + 1e-6 for v in d["normalised"])
    assert got["directions"]["bca.t2s"]["keys"] == [2.0, 2.0]  # a tubelet's two frames
    assert (tmp_path / "out" / "entropy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bca.s2t" in capsys.readouterr().out

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
from fusionkit.engine.inspection import attention_maps, received, row_entropy, summarise  # noqa: E402


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


def test_received_attention_is_the_brute_force_sum_over_queries():
    """T2S (time windows: one per location) and S2T (space windows: one per frame, the spatial expert's CLS
    left out) put each window's key weights back at the key tokens."""
    model = randomised_tiny()
    with torch.no_grad(), recording() as records:
        model({"video": torch.randn(2, 3, 4, 32, 32), "audio": torch.randn(2, 1600)})
    t2s, s2t = records[0], records[1]
    assert (t2s.context["query"], t2s.context["key"], s2t.context["key"]) == ("spatial", "temporal", "spatial")
    per_key = t2s.weights.sum(-2).mean(1).reshape(2, 16, 2)           # (B, location n, frame t)
    expected = per_key.permute(0, 2, 1).reshape(2, 32)                # temporal tokens are (t, n)-major
    torch.testing.assert_close(received(t2s), expected)
    lay = s2t.context["key_layout"]                                    # spatial: one CLS per frame
    got = received(s2t).reshape(2, lay.t, 1 + 16)
    assert torch.equal(got[:, :, 0], torch.zeros(2, lay.t))           # CLS never a key
    torch.testing.assert_close(got[:, :, 1:], s2t.weights.sum(-2).mean(1).reshape(2, lay.t, 16))
    maps = attention_maps(records)
    assert maps["bca.t2s"]["grid"] == [2, 4, 4] and maps["bca.t2s"]["steps"] == [0, 1]
    share = maps["bca.t2s"]["share"][0]
    torch.testing.assert_close(share, expected.mean(0).reshape(2, 4, 4) / expected.mean(0).sum())


def test_inspect_draws_maps_over_what_the_key_expert_sees(tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, (8, 48, 48, 3), dtype=np.uint8)
    clip = write_video(tmp_path / "clip.mp4", frames)
    assert main(["inspect", "tiny", "--video", str(clip), "--out", str(tmp_path / "out"), "--json"]) == 0
    got = json.loads((tmp_path / "out" / "entropy.json").read_text())
    assert set(got["maps"]) == {"bca.t2s", "bca.s2t"}
    for m in got["maps"].values():
        shares = np.array(m["share"])                                  # (steps, T, H, W)
        assert shares.shape == (2, *m["grid"]) and np.allclose(shares.sum(axis=(1, 2, 3)), 1.0, atol=1e-4)
    for name in got["maps"]:
        assert (tmp_path / "out" / f"attention_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

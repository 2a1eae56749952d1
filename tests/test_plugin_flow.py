"""examples/fusionkit-flow, installed as a user installs a plugin: a new modality, expert and recipe, no
edit inside fusionkit/. The plugin is installed into a throwaway venv (test_wheel's helpers) and used from
outside the repository: its flow producer on a real H.264 clip whose content moves by a known vector,
then one training epoch of its recipe (CAST + flow through B-CA) from real files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from media import write_video  # noqa: E402
from test_wheel import make_venv, pip_install, run  # noqa: E402

PLUGIN = Path(__file__).resolve().parent.parent / "examples" / "fusionkit-flow"
SIDE, N = 64, 8


def moving_frames(dx: int, dy: int, seed: int) -> np.ndarray:
    """``(N, 64, 64, 3)`` uint8: a window over 4-px random cells whose content moves ``(dx, dy)`` px per frame."""
    tex = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    return np.stack([tex[40 - dy * i:40 - dy * i + SIDE, 40 - dx * i:40 - dx * i + SIDE] for i in range(N)])


PROBE = """
import json, sys
import numpy as np
from fusionkit.data import decode
from fusionkit.registry import EXPERTS, MODALITIES
flow = MODALITIES.get("flow")()
info = decode.probe(sys.argv[1])
field = flow.decode(sys.argv[1], [0, 3, 5], info)
inner = field[:, :, 8:-8, 8:-8]
print(json.dumps({"shape": list(field.shape), "first": float(np.abs(field[:, 0]).max()),
                  "dx": sorted(set(inner[0, 1:].ravel().tolist())), "dy": sorted(set(inner[1, 1:].ravel().tolist())),
                  "expert": "flow_vit" in EXPERTS.names()}))
"""


@pytest.mark.slow  # a venv, a plugin build and two subprocesses that import torch, one trains: about 40 s
def test_installed_flow_plugin_produces_flow_and_trains_cast_with_it(tmp_path):
    python = make_venv(tmp_path / "venv")
    # fusionkit as make installs it (editable), the plugin as a user would (a regular install)
    pip_install(python, "--no-build-isolation", "-e", str(PLUGIN.parent.parent), str(PLUGIN), cwd=tmp_path)
    media = tmp_path / "media"
    media.mkdir()
    clips = [write_video(media / f"c{i}.mp4", moving_frames(dx, dy, i), gop=4, options={"bf": "0"})
             for i, (dx, dy) in enumerate([(3, -2), (-2, 1), (0, 0), (1, 2)])]
    # the producer: every inner block of a frame after the first moved by the clip's vector
    got = json.loads(run([str(python), "-c", PROBE, str(clips[0])], cwd=tmp_path))
    assert got == {"shape": [2, 3, SIDE, SIDE], "first": 0.0, "dx": [3.0], "dy": [-2.0], "expert": True}
    rows = tmp_path / "clips.csv"
    rows.write_text("path,verb,noun\n" + "".join(f"{c},{i % 4},{i % 5}\n" for i, c in enumerate(clips)))
    cli = str(tmp_path / "venv" / "bin" / "fusionkit")
    out = run([cli, "train", "cast_flow_tiny", f"data.train.path={rows}", f"data.val.path={rows}",
               "--output-dir", str(tmp_path / "run"), "--no-progress"], cwd=tmp_path)
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["kind"] == "epoch"]
    assert len(epochs) == 1 and np.isfinite(epochs[0]["train/loss"]), out[-2000:]
    assert epochs[0]["val/num_samples"] == 4 and epochs[0]["val/skipped"] == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "best.safetensors"), "pt") as f:
        names = list(f.keys())
    assert any(n.startswith("experts.flow.") for n in names)  # the plugin's expert trained and was saved
    assert any(".cross.f2t." in n for n in names) and any(".cross.t2f." in n for n in names)

"""Engine tests on the tiny recipe (recipes/tiny.yaml, synthetic data): training, resume, faults,
checkpoints, optimizer groups, eval and predict."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fusionkit  # noqa: F401 - registers the built-ins
from fusionkit.data.collate import collate
from fusionkit.data.synthetic import SyntheticDataset
from fusionkit.engine import distributed
from fusionkit.engine.checkpoint import CheckpointManager, read_meta, read_tensors, state_path
from fusionkit.cli import main as engine_main
from fusionkit.engine.evaluate import combine, evaluate, run_eval
from fusionkit.engine.loading import make_loader
from fusionkit.engine.optim import param_groups
from fusionkit.engine.trainer import NonFiniteLossError, train
from fusionkit.recipes import RecipeError, build_from_config, load_recipe

ROOT = Path(__file__).resolve().parent.parent
FAST = ["data.train.size=32", "data.val.size=16", "train.batch_size=8", "train.log_every=1000"]


def run(tmp: Path, *overrides: str, resume=None):
    return train("tiny", [*FAST, *overrides], output_dir=tmp, resume=resume, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run shared by the checkpoint, eval and predict tests (3 epochs of 4 steps)."""
    out = tmp_path_factory.mktemp("run")
    result = run(out, "train.epochs=3", "train.eval_every=3", "train.checkpoint.keep_last=2")
    return out, result


def test_tiny_recipe_trains_and_loss_goes_down(trained):
    out, result = trained
    assert result.status == "finished" and result.step == 12 and len(result.losses) == 12
    assert all(math.isfinite(x) for x in result.losses)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 0.1, result.losses
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert "val/action/top1" in rows[-1] and "val/verb/top5" in rows[-1] and "val/noun/mca" in rows[-1]
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["epoch", "step", "train/loss", "lr"] and "val/action/top1" in header


def test_checkpoint_holds_trainable_tensors_and_json_metadata(trained):
    out, result = trained
    model = build_from_config(load_recipe("tiny", FAST))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    tensors = read_tensors(result.checkpoint)
    assert set(tensors) == trainable
    meta = read_meta(result.checkpoint)["fusionkit"]
    assert meta["trainable_only"] and meta["step"] == 12 and meta["recipe"]["name"] == "tiny"
    assert meta["frozen_sources"]["temporal"]["type"] == "videomae_vit"
    assert set(meta["metrics"]) >= {"verb/top1", "noun/top1", "action/top1"}
    state = read_meta(state_path(result.checkpoint))["state"]
    assert state["step"] == 12 and state["scheduler"]["last_step"] == 12
    assert any(k.startswith("optimizer.") and k.endswith("exp_avg") for k in read_tensors(state_path(result.checkpoint)))
    # atomic writes leave no temporary file; keep_last=2 keeps the last two step checkpoints, plus best
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")]
    assert [s for s, _ in CheckpointManager(out).steps()] == [8, 12]
    assert "best.safetensors" in names and "step_000000004.safetensors" not in names


def test_keep_last_and_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, mode="max")
    w = {"a": torch.ones(2)}
    for step in range(1, 5):
        manager.save(step, w, {"step": step}, {"x": torch.zeros(1)}, {"step": step})
    assert [s for s, _ in manager.steps()] == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["step_000000003.safetensors", "step_000000003.state.safetensors",
         "step_000000004.safetensors", "step_000000004.state.safetensors"])
    assert manager.save_best(1.0, w, {}) is not None
    assert manager.save_best(0.5, w, {}) is None
    assert manager.save_best(2.0, w, {}) is not None and manager.best == 2.0
    assert manager.latest().name == "step_000000004.safetensors"


@pytest.mark.slow
def test_resume_gives_the_same_loss_sequence(tmp_path):
    common = ["train.epochs=2", "train.eval_every=0", "train.mixup=0.8", "train.accum_steps=2", "train.batch_size=4"]
    full = run(tmp_path / "full", *common)
    assert full.step == 8
    part = run(tmp_path / "part", *common, "train.max_steps=3")
    assert part.status == "max_steps" and part.step == 3
    rest = run(tmp_path / "part", *common, resume="auto")
    assert rest.step == 8
    assert part.losses + rest.losses == full.losses  # exact, step by step


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "fusionkit", "train", "tiny", *FAST, "train.epochs=1000",
           "train.eval_every=0", "train.log_every=1", "--output-dir", str(tmp_path), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.time() + 120
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 2/"):
                break
            assert time.time() < deadline, "".join(lines)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + rest
    assert proc.returncode == 0, output
    assert "SIGTERM" in output and "interrupted" in output
    latest = CheckpointManager(tmp_path).latest()
    assert latest is not None and state_path(latest).is_file()
    assert read_meta(latest)["fusionkit"]["step"] >= 2


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at step \d+"):
        run(tmp_path, "train.epochs=1", "train.eval_every=0", "data.train.nan=[5]")


def test_nonfinite_loss_skip_drops_the_update(tmp_path):
    result = run(tmp_path, "train.epochs=1", "train.eval_every=0", "data.train.nan=[5]", "train.nonfinite=skip")
    assert result.status == "finished" and result.skipped_steps == 1
    assert sum(math.isnan(x) for x in result.losses) == 1
    tensors = read_tensors(result.checkpoint)
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_corrupt_items_are_skipped(tmp_path):
    ds = SyntheticDataset(size=4, corrupt=[1])
    batch = collate([ds[i] for i in range(4)])
    assert batch["video"].shape[0] == 3 and batch["labels"]["verb"].shape == (3,)
    assert batch["skipped"] == [("synthetic://0/1/0", "synthetic corrupt item (cannot decode)")]
    result = run(tmp_path, "train.epochs=1", "train.eval_every=0", "data.train.corrupt=[0,3,7]")
    assert result.status == "finished" and result.skipped_items == 3
    assert all(math.isfinite(x) for x in result.losses)


def test_optimizer_groups_by_hand():
    cfg = load_recipe("tiny", ["trainable.unfreeze=[experts.*.pool_norm.*,experts.temporal.patch_embed.*]"])
    model = build_from_config(cfg)
    groups = param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5,
                          no_weight_decay=["*.pos_q", "*.pos_kv"], head_lr_scale=10.0)
    where = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["names"]}
    assert set(where) == {n for n, p in model.named_parameters() if p.requires_grad}
    # 2 graph steps: embeddings id 0, step s id s + 1, norms / heads id 3; lr = 0.5 ** (3 - id)
    assert where["experts.temporal.patch_embed.proj.weight"] == (0.125, 0.05)
    assert where["experts.temporal.patch_embed.proj.bias"] == (0.125, 0.0)
    assert where["experts.temporal.blocks.0.attn_adapter.D_fc1.weight"] == (0.25, 0.05)
    assert where["experts.spatial.vit.blocks.1.mlp_adapter.D_fc2.bias"] == (0.5, 0.0)
    assert where["fusions.bca.0.down.spatial.weight"] == (0.25, 0.05)
    assert where["fusions.bca.1.cross.t2s.pos_q"] == (0.5, 0.0)
    assert where["fusions.bca.1.norm.temporal.weight"] == (0.5, 0.0)
    assert where["experts.temporal.pool_norm.weight"] == (1.0, 0.0)
    assert where["heads.verb.fc.weight"] == (10.0, 0.05)
    assert where["heads.noun.fc.bias"] == (10.0, 0.0)


def test_unknown_train_key_names_the_closest(tmp_path):
    with pytest.raises(RecipeError, match="train.epoch.*epochs"):
        run(tmp_path, "train.epoch=3")
    with pytest.raises(RecipeError, match="train.checkpoint.keep_lats.*keep_last"):
        run(tmp_path, "train.checkpoint.keep_lats=3")


def test_bf16_autocast_on_cpu(tmp_path):
    result = run(tmp_path, "train.epochs=1", "train.max_steps=2", "train.eval_every=0", "train.precision=bf16")
    assert result.step == 2 and all(math.isfinite(x) for x in result.losses)


class _Decoder(torch.nn.Module):
    """Reads the class back from the clip (verb right always, noun always predicted as 0)."""

    heads: dict = {}

    def __init__(self, classes):
        super().__init__()
        self.classes = classes
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, batch):
        v = batch["video"][:, 0].mean(dim=(1, 2, 3))
        verb = torch.round((v + 1) / 2 * (self.classes["verb"] - 1)).long()
        return {"verb": torch.nn.functional.one_hot(verb, self.classes["verb"]).float() * 5,
                "noun": torch.nn.functional.one_hot(torch.zeros_like(verb), self.classes["noun"]).float() * 5}


def test_metrics_on_known_predictions():
    classes = {"verb": 4, "noun": 5}
    ds = SyntheticDataset(size=40, classes=classes, noise=0.0, views=2, seed=3)
    loader = make_loader(ds, 8, distributed.ShardedSampler(len(ds), shuffle=False), 0)
    metrics = evaluate(_Decoder(classes), loader, torch.device("cpu"), action=("verb", "noun"))
    labels = [ds.labels(2 * c) for c in range(20)]
    noun0 = sum(lab["noun"] == 0 for lab in labels) / 20
    assert metrics["num_samples"] == 20  # two views per clip merged
    assert metrics["verb/top1"] == 100.0 and metrics["verb/mca"] == 100.0
    assert metrics["noun/top1"] == pytest.approx(100 * noun0)
    assert metrics["action/top1"] == pytest.approx(100 * noun0)
    present = {lab["noun"] for lab in labels}
    assert metrics["noun/mca"] == pytest.approx(100 / len(present))
    both = combine({"a": {"verb/top1": 50.0, "num_samples": 4.0}, "b": {"verb/top1": 100.0, "num_samples": 2.0}})
    assert both["a/verb/top1"] == 50.0 and both["hmean/verb/top1"] == pytest.approx(200 / 3)


def test_eval_reproduces_the_training_metrics(trained):
    out, result = trained
    metrics = run_eval("tiny", str(result.checkpoint), FAST, progress=False)
    saved = read_meta(result.checkpoint)["fusionkit"]["metrics"]
    for key, value in saved.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    assert engine_main(["eval", "tiny", *FAST, "--checkpoint", str(result.checkpoint), "--json"]) == 0


def test_predict_json(trained, tmp_path, capsys):
    _, result = trained
    clip = tmp_path / "clip.safetensors"
    save_file(SyntheticDataset(size=4, seed=1).example(2), str(clip))
    capsys.readouterr()
    assert engine_main(["predict", "tiny", "--video", str(clip), "--checkpoint", str(result.checkpoint), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint"] == str(result.checkpoint)
    preds = out["predictions"]
    assert set(preds) == {"verb", "noun"} and len(preds["verb"]) == 4 and len(preds["noun"]) == 5
    probs = [p["prob"] for p in preds["noun"]]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert [p["rank"] for p in preds["verb"]] == [1, 2, 3, 4]
    assert engine_main(["predict", "tiny", "--video", str(tmp_path / "clip.mp4")]) == 2  # missing file: clear error


@pytest.mark.slow
def test_test_time_ensemble_trains_members_on_their_label_and_scores_groups(tmp_path):
    """Two heads per label (one per expert) train on the shared label; eval scores their average."""
    ensemble = ["heads.verb=null", "heads.noun=null",
                "heads.verb_s={type: linear, expert: spatial, classes: 4, target: verb}",
                "heads.verb_t={type: linear, expert: temporal, classes: 4, target: verb}",
                "heads.noun_s={type: linear, expert: spatial, classes: 5, target: noun}",
                "heads.noun_t={type: linear, expert: temporal, classes: 5, target: noun}",
                "eval.ensemble={verb: {heads: [verb_s, verb_t]}, noun: {heads: [noun_s, noun_t], combine: logits}}"]
    result = run(tmp_path, "train.epochs=1", "train.eval_every=1", *ensemble)
    assert result.status == "finished" and all(math.isfinite(x) for x in result.losses)
    metrics = run_eval("tiny", str(result.checkpoint), [*FAST, *ensemble], progress=False)
    assert {"verb/top1", "noun/top1", "action/top1"} <= set(metrics)
    assert not any(k.startswith(("verb_s", "noun_t")) for k in metrics)
    with pytest.raises(KeyError, match=r"ensemble 'verb': no logits for head\(s\) \['nope'\]"):
        run_eval("tiny", str(result.checkpoint), [*FAST, *ensemble[:6], "eval.ensemble={verb: {heads: [nope]}}"],
                 progress=False)

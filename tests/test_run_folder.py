"""The run folder of ``fusionkit train`` (tiny recipe, synthetic data): recipe.yaml, train.log, step rows
of metrics.jsonl (grad norm against a brute-force norm), TensorBoard (a fake writer; absent), curves.png,
``fusionkit plot``, ``fusionkit config`` and the eval bar's fields."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

import fusionkit  # noqa: F401 - registers the built-ins
from fusionkit.cli import main
from fusionkit.engine import tensorboard_log
from fusionkit.engine.config import EVAL_DEFAULTS, TRAIN_DEFAULTS, eval_config, train_config
from fusionkit.engine.metrics_file import read_rows
from fusionkit.engine.progress import Reporter
from fusionkit.engine.trainer import Trainer
from fusionkit.recipes import load_recipe

FAST = ["data.train.size=32", "data.val.size=16", "train.batch_size=8", "train.epochs=1"]
PNG = b"\x89PNG\r\n\x1a\n"
STEP_KEYS = {"kind", "step", "epoch", "train/loss", "lr", "clips_per_s", "grad_norm"}


def fit(out: Path, *overrides: str, resume=None, progress=False, console=None):
    trainer = Trainer(load_recipe("tiny", [*FAST, *overrides]), out, resume=resume, progress=progress,
                      console=console or Console(file=io.StringIO(), width=100))
    return trainer, trainer.fit()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One epoch of 4 steps, a step row every 2 steps, validation at the end; the console's text."""
    out = tmp_path_factory.mktemp("run") / "tiny-a"
    buf = io.StringIO()
    trainer, result = fit(out, "train.log_every=2", console=Console(file=buf, width=100))
    return out, trainer, result, buf.getvalue()


def test_recipe_yaml_is_the_resolved_recipe(run):
    out, trainer, _, _ = run
    resolved = load_recipe("tiny", FAST + ["train.log_every=2"])
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == resolved == trainer.recipe
    assert load_recipe(out / "recipe.yaml") == resolved  # fusionkit train RUN/recipe.yaml trains it again


def test_train_log_is_the_console_text_without_markup(run):
    out, _, _, console = run
    lines = (out / "train.log").read_text().splitlines()
    assert re.match(r"== \d{4}-\d\d-\d\d \d\d:\d\d:\d\d fusionkit train tiny \(new run\) in ", lines[0])
    assert lines[1:] == console.splitlines()  # the same text, line for line
    assert "step 2/4 epoch 1/1 loss" in lines[2] and "grad norm" in lines[2]
    assert any(line.startswith("epoch 1: train/loss") for line in lines)
    assert any("Training summary" in line for line in lines)
    assert "\x1b[" not in "".join(lines) and "[bold" not in "".join(lines)


def test_step_rows_beside_the_epoch_rows(run):
    out, _, result, _ = run
    rows = read_rows(out)
    assert [(r["kind"], r["step"]) for r in rows] == [("step", 2), ("step", 4), ("epoch", 4)]
    steps = rows[:2]
    assert all(set(r) == STEP_KEYS for r in steps)
    assert [r["epoch"] for r in steps] == [0.5, 1.0]  # fractional epochs
    assert [r["train/loss"] for r in steps] == [result.losses[1], result.losses[3]]  # the loss of that step
    assert all(r["clips_per_s"] > 0 and r["grad_norm"] > 0 and 0 < r["lr"] < 1 for r in steps)
    epoch = rows[2]
    assert epoch["epoch"] == 1 and "val/action/top1" in epoch
    assert epoch["train/loss"] == pytest.approx(sum(result.losses) / 4)
    header = (out / "metrics.csv").read_text().splitlines()
    assert len(header) == 2 and header[0].split(",")[:4] == ["epoch", "step", "train/loss", "lr"]  # epoch rows
    assert "kind" not in header[0] and "grad_norm" not in header[0]


def test_curves_png_is_written_at_the_end(run):
    out = run[0]
    data = (out / "curves.png").read_bytes()
    assert data.startswith(PNG)
    from PIL import Image

    with Image.open(out / "curves.png") as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 500


def test_grad_norm_is_the_total_norm_of_the_trainable_gradients_before_clipping(tmp_path):
    one = ["train.log_every=1", "train.max_steps=1", "train.eval_every=0"]
    trainer, _ = fit(tmp_path / "free", *one, "train.clip_grad=null")
    params = dict(trainer.model.named_parameters())
    assert all(p.grad is None for p in params.values() if not p.requires_grad)  # frozen: no gradient
    grads = [p.grad.double() for p in params.values() if p.requires_grad and p.grad is not None]
    brute = math.sqrt(sum(float((g * g).sum()) for g in grads))  # step 1's gradients are still there
    row = read_rows(tmp_path / "free")[0]
    assert row["kind"] == "step" and row["step"] == 1
    assert row["grad_norm"] == pytest.approx(brute, rel=1e-5)
    clipped, _ = fit(tmp_path / "clipped", *one, f"train.clip_grad={brute / 10}")
    assert read_rows(tmp_path / "clipped")[0]["grad_norm"] == pytest.approx(brute, rel=1e-5)  # before clipping
    after = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in clipped.trainable if p.grad is not None))
    assert after == pytest.approx(brute / 10, rel=1e-4)


def test_resume_appends_to_the_log_and_keeps_a_differing_recipe(tmp_path):
    short = ["train.eval_every=0", "train.log_every=1000"]
    fit(tmp_path, *short, "train.max_steps=2")
    fit(tmp_path, *short, "train.max_steps=3", resume="auto")
    assert sorted(p.name for p in tmp_path.glob("recipe*.yaml")) == ["recipe.step_2.yaml", "recipe.yaml"]
    assert load_recipe(tmp_path / "recipe.step_2.yaml")["train"]["max_steps"] == 2
    assert load_recipe(tmp_path / "recipe.yaml")["train"]["max_steps"] == 3
    fit(tmp_path, *short, "train.max_steps=3", resume="auto")  # the same recipe: nothing kept aside
    assert len(list(tmp_path.glob("recipe*.yaml"))) == 2
    log = (tmp_path / "train.log").read_text()
    assert log.count("== ") == 3 and log.count("(resume)") == 2 and "resuming from step 2: " in log
    assert ("the recipe differs from the saved " in log and "train.max_steps: 2 -> 3" in log
            and "kept as recipe.step_2.yaml" in log)


class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter."""

    made: list[FakeWriter] = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_gets_the_same_scalars(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorboard_log, "_WRITER_CLASS", [FakeWriter])
    FakeWriter.made = []
    fit(tmp_path, "train.log_every=2", "train.max_steps=2", "train.eval_every=0")
    fit(tmp_path, "train.log_every=2", resume="auto")
    first, second = FakeWriter.made
    assert first.log_dir == str(tmp_path / "tb") and first.purge_step is None and first.closed and second.closed
    assert second.purge_step == 3  # the events after the resumed step 2 are hidden
    rows = read_rows(tmp_path)
    got = {(tag, step): value for w in (first, second) for tag, value, step in w.scalars}
    for row in rows:
        for key, value in row.items():
            if key not in ("kind", "step", "epoch"):
                tag = key if key.startswith("val/") else f"{row['kind']}/{key}"
                assert got[(tag, row["step"])] == pytest.approx(value), (tag, row["step"])
    assert {"step/train/loss", "step/lr", "step/clips_per_s", "step/grad_norm", "epoch/train/loss",
            "val/action/top1"} <= {tag for tag, _ in got}


def test_without_tensorboard_everything_else_works_and_one_debug_line_says_so(tmp_path, monkeypatch, caplog,
                                                                              capsys):
    monkeypatch.setattr(tensorboard_log, "_WRITER_CLASS", [])
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` raises ImportError
    with caplog.at_level(logging.DEBUG, logger="fusionkit.engine"):
        for name in ("a", "b"):
            fit(tmp_path / name, "train.log_every=2", "train.max_steps=2", "train.eval_every=0")
    notes = [r for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.DEBUG
    assert "tensorboard" not in capsys.readouterr().out.lower()
    for name in ("a", "b"):
        assert not (tmp_path / name / "tb").exists()
        assert (tmp_path / name / "curves.png").is_file() and len(read_rows(tmp_path / name)) == 1


def test_real_tensorboard_writes_event_files(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setattr(tensorboard_log, "_WRITER_CLASS", [])
    fit(tmp_path, "train.log_every=2", "train.max_steps=2", "train.eval_every=0")
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_fusionkit_plot_overlays_runs(run, tmp_path, capsys):
    out = run[0]
    other = tmp_path / "tiny-b"
    fit(other, "train.log_every=1", "train.max_steps=3", "train.eval_every=0")  # step rows only
    target = tmp_path / "both.png"
    assert main(["plot", str(out), str(other), "--out", str(target)]) == 0
    assert target.read_bytes().startswith(PNG) and f"wrote {target}" in capsys.readouterr().out
    assert main(["plot", str(other)]) == 0 and (other / "curves.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("make", ["missing", "empty folder", "empty metrics"])
def test_fusionkit_plot_on_a_bad_folder_is_one_line(tmp_path, capsys, make):
    bad = tmp_path / "bad"
    if make != "missing":
        bad.mkdir()
    if make == "empty metrics":
        (bad / "metrics.jsonl").write_text("")
    assert main(["plot", str(bad)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0] and "Traceback" not in err


def test_fusionkit_config_prints_every_engine_key_with_its_default(capsys):
    assert main(["config", "tiny", "train.epochs=7"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^  epochs: 7 +# default: 50$", text, re.M)
    assert re.search(r"^  max_steps: null +# default$", text, re.M)
    assert re.search(r"^    keep_last: 3 +# default$", text, re.M)  # train.checkpoint.keep_last
    assert re.search(r"^  topk: 5 +# default$", text, re.M)          # eval.topk
    parsed = yaml.safe_load(text)
    recipe = load_recipe("tiny", ["train.epochs=7"])
    assert parsed["train"] == train_config(recipe) and parsed["eval"] == eval_config(recipe)
    assert parsed["heads"] == recipe["heads"]
    leaves = len([k for k, v in TRAIN_DEFAULTS.items() if not isinstance(v, dict) or k == "loss_weights"])
    leaves += len(TRAIN_DEFAULTS["checkpoint"]) + len(TRAIN_DEFAULTS["distributed"]) + len(EVAL_DEFAULTS)
    assert text.count("# default") == leaves
    assert main(["config", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["defaults"]["train"]["epochs"] == 50


def test_the_eval_bar_shows_only_its_own_fields():
    def shown(**kw):
        buf = io.StringIO()
        reporter = Reporter(4, "x", live=True, console=Console(file=buf, force_terminal=True, width=160), **kw)
        reporter.update(1, clips=8, epoch="1/2", loss=1.5, lr=0.01)
        bar = reporter.sub_bar("val epoch 1", 2)
        bar.update(8)
        reporter.close()
        return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buf.getvalue())

    train = shown()
    assert "epoch 1/2" in train and "loss 1.5" in train and "lr 0.01" in train
    val = [line for line in train.splitlines() if "val epoch 1" in line]
    assert val and all("loss" not in line and "lr " not in line and "clips/s" in line for line in val)
    evaluation = shown(fields=())
    assert "clips/s" in evaluation and "loss" not in evaluation and "lr " not in evaluation


def test_validation_inside_train_shows_a_bar(tmp_path):
    buf = io.StringIO()
    fit(tmp_path, "train.max_steps=4", progress=True, console=Console(file=buf, force_terminal=True, width=160))
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buf.getvalue())
    val = [line for line in text.splitlines() if "val epoch 1" in line]
    assert val and all("loss" not in line for line in val)
    assert "step 1/4" in (tmp_path / "train.log").read_text()  # the live bar's steps are kept in the log


def test_fusionkit_eval_bar_has_no_training_fields(run, monkeypatch):
    from fusionkit.engine.evaluate import run_eval

    seen = {}
    real = Reporter.__init__

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        real(self, *args, **kwargs)

    monkeypatch.setattr(Reporter, "__init__", spy)
    run_eval(load_recipe("tiny", FAST), str(run[2].checkpoint), progress=False,
                      console=Console(file=io.StringIO()))
    assert seen["fields"] == ()


def test_grad_norm_helper_matches_a_hand_computed_norm():
    from fusionkit.engine.trainer import grad_norm

    a, b, c = torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True), torch.zeros(1)
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([[0.0, 4.0], [0.0, 12.0]])
    assert float(grad_norm([a, b, c])) == pytest.approx(13.0)  # sqrt(9 + 16 + 144); c has no gradient
    assert float(grad_norm([c])) == 0.0

"""Fault injection on the tiny recipe: nothing is lost. A run directory belongs to one run (lock file,
no silent mixing with another run), too many undecodable clips or skipped steps stop the run, late
failures are found before the first step, disk full and Ctrl-C end cleanly (Ctrl-C with a checkpoint
from which the run resumes exactly), and the leftovers of a killed run are cleaned up on resume."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusionkit  # noqa: F401 - registers the built-ins
from fusionkit.cli import main
from fusionkit.engine import checkpoint as ckpt
from fusionkit.engine.checkpoint import CheckpointError, CheckpointManager, RunDirError, RunLock, read_meta, state_path
from fusionkit.engine.trainer import NonFiniteLossError, Trainer, train
from fusionkit.errors import DataError
from fusionkit.recipes import RecipeError

FAST = ["data.train.size=32", "data.val.size=16", "train.batch_size=8", "train.log_every=1000", "train.eval_every=0"]
ALL = "[" + ",".join(str(i) for i in range(32)) + "]"  # every item of data.train


def run(out: Path, *overrides: str, resume=None):
    return train("tiny", [*FAST, *overrides], output_dir=out, resume=resume, progress=False)


def files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name != "tb")  # tb/: only with the tensorboard extra


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_line(capsys, code: int) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(out: Path, pid: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": 0}))


# -- a run directory is owned by one run ------------------------------------------------------------

def test_a_second_concurrent_run_fails_naming_the_lock_holder(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, holder.pid)
        with pytest.raises(RunDirError, match=rf"in use by another run \(pid {holder.pid} on .*run\.lock"):
            run(tmp_path, "train.epochs=1")
        line = one_line(capsys, main(["train", "tiny", *FAST, "--output-dir", str(tmp_path), "--no-progress"]))
        assert f"pid {holder.pid}" in line
        assert files(tmp_path) == ["run.lock"]  # nothing written beside the other run's lock
    finally:
        holder.kill()
        holder.wait()
    result = run(tmp_path, "train.epochs=1")  # its process is gone: the stale lock is taken over
    assert result.status == "finished" and "run.lock" not in files(tmp_path)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    write_lock(tmp_path, dead_pid())
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.holder()["pid"] == os.getpid()
    with pytest.raises(RunDirError, match="in use by another run"):
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / "run.lock").exists()


@pytest.mark.slow
def test_a_new_run_never_replaces_another_run(tmp_path, capsys):
    first = run(tmp_path, "train.epochs=1", "train.eval_every=1")
    before = {name: (tmp_path / name).read_bytes() for name in files(tmp_path)}
    assert "best.safetensors" in before and "metrics.jsonl" in before
    with pytest.raises(RunDirError, match="already holds a run .*--resume.*--output-dir"):
        run(tmp_path, "train.epochs=1")
    line = one_line(capsys, main(["train", "tiny", *FAST, "--output-dir", str(tmp_path)]))
    assert "--resume" in line
    assert {name: (tmp_path / name).read_bytes() for name in files(tmp_path)} == before  # untouched
    again = run(tmp_path, "train.epochs=2", resume="auto")  # the same run, continued
    assert again.step == 8 and first.step == 4 and [r["epoch"] for r in rows(tmp_path)] == [1, 2]


@pytest.mark.slow
def test_resume_auto_on_a_missing_or_empty_directory_starts_fresh(tmp_path):
    short = ["train.epochs=1", "train.max_steps=2"]
    missing = run(tmp_path / "missing", *short, resume="auto")
    (tmp_path / "empty").mkdir()
    empty = run(tmp_path / "empty", *short, resume="auto")
    fresh = run(tmp_path / "fresh", *short)
    assert missing.losses == empty.losses == fresh.losses and len(fresh.losses) == 2


def test_pruning_touches_only_checkpoints_of_its_own_run(tmp_path):
    w = {"a": torch.ones(2)}
    other = CheckpointManager(tmp_path, keep_last=1, run_id="other")
    for step in (10, 20):
        other.save(step, w, {}, {"x": torch.zeros(1)}, {"step": step})
    mine = CheckpointManager(tmp_path, keep_last=2, run_id="mine")
    for step in (1, 2, 3):
        mine.save(step, w, {}, {"x": torch.zeros(1)}, {"step": step})
    assert [s for s, _ in mine.steps()] == [2, 3, 20]  # the other run's step 20 is kept, ours pruned to 2
    assert read_meta(state_path(mine.path(3)))["state"]["run_id"] == "mine"


@pytest.mark.slow
def test_resuming_from_an_older_checkpoint_moves_the_later_ones_aside(tmp_path):
    full = run(tmp_path / "full", "train.epochs=2")
    part = tmp_path / "part"
    run(part, "train.epochs=2")
    older = CheckpointManager(part).path(4)
    rest = run(part, "train.epochs=2", resume=older)
    assert rest.losses == full.losses[4:]
    assert [s for s, _ in CheckpointManager(part).steps()] == [4, 8]
    assert sorted(p.name for p in (part / "superseded").iterdir()) == [
        "step_000000008.safetensors", "step_000000008.state.safetensors"]
    assert [r["epoch"] for r in rows(part)] == [1, 2]


# -- too many undecodable clips / skipped steps -------------------------------------------------------

def test_an_all_corrupt_training_set_is_an_error_naming_the_count(tmp_path, capsys):
    with pytest.raises(DataError, match=r"every one of the 32 clips of epoch 1 failed to decode; e\.g\. synthetic://"):
        run(tmp_path / "a", "train.epochs=1", "train.eval_every=1", f"data.train.corrupt={ALL}")
    assert files(tmp_path / "a") == ["recipe.yaml", "train.log"]  # no "best" model, no checkpoint, no metrics row
    assert (tmp_path / "a" / "train.log").read_text().splitlines()[-1].startswith(
        "error: data.train: every one of the 32 clips of epoch 1 failed to decode")  # why it stopped
    line = one_line(capsys, main(["train", "tiny", *FAST, f"data.train.corrupt={ALL}", "--output-dir",
                                  str(tmp_path / "b"), "--no-progress"]))
    assert "32 clips" in line


def test_the_skipped_fraction_threshold(tmp_path):
    corrupt = "data.train.corrupt=[0,1,2,3,4,5,6,7,8,9]"  # 10 of 32 clips
    with pytest.raises(DataError, match=r"of the 32 clips \(more than train\.max_skipped_fraction=0\.25\)"):
        run(tmp_path / "a", "train.epochs=1", corrupt, "train.max_skipped_fraction=0.25")
    assert run(tmp_path / "b", "train.epochs=1", corrupt).skipped_items == 10  # default: only "all" fails
    with pytest.raises(RecipeError, match="max_skipped_fraction"):
        run(tmp_path / "c", "train.max_skipped_fraction=2")


def test_an_all_corrupt_eval_split_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"evaluation set 'val': every one of its 16 clips failed to decode"):
        run(tmp_path, "train.epochs=1", "train.eval_every=1", "data.val.corrupt=[" +
            ",".join(str(i) for i in range(16)) + "]")
    assert "best.safetensors" not in files(tmp_path)


def test_nonfinite_skip_stops_beyond_its_fraction(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"3 of the 4 steps of epoch 1 had a non-finite loss"):
        run(tmp_path, "train.epochs=1", "train.nonfinite=skip", f"data.train.nan={ALL}")


# -- late failures found before the first step --------------------------------------------------------

def no_step(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a training step ran before the check")
    monkeypatch.setattr(Trainer, "_step", fail)


def test_an_output_dir_that_is_a_file(tmp_path, monkeypatch, capsys):
    no_step(monkeypatch)
    path = tmp_path / "file"
    path.write_text("not a directory")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        run(path, "train.epochs=1")
    line = one_line(capsys, main(["train", "tiny", *FAST, "--output-dir", str(path / "sub")]))
    assert str(path) in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_an_output_dir_that_is_not_writable(tmp_path, monkeypatch):
    no_step(monkeypatch)
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(RunDirError, match="not writable|Permission denied"):
            run(tmp_path / "run", "train.epochs=1")
    finally:
        tmp_path.chmod(0o700)


def test_a_head_whose_label_the_data_lacks(tmp_path, monkeypatch):
    no_step(monkeypatch)
    with pytest.raises(RecipeError, match=r"heads\.noun trains on the label 'nuon', but data\.train has no such "
                                          r"label .*closest: noun"):
        run(tmp_path, "train.epochs=1", "heads.noun.target=nuon")
    with pytest.raises(RecipeError, match=r"data\.train has 5 classes of 'noun' but heads\.noun has 3"):
        run(tmp_path, "train.epochs=1", "heads.noun.classes=3")


# -- disk full, Ctrl-C ----------------------------------------------------------------------------

def test_disk_full_while_writing_a_checkpoint_ends_cleanly(tmp_path, monkeypatch, capsys):
    real = ckpt.atomic_write_bytes

    def writer(path, data):
        if Path(path).name == "step_000000004.safetensors":  # the state is written, then the disk is full
            Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp").unlink(missing_ok=True)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", writer)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*step_000000004\.safetensors: No space left "
                                              r"on device \(ENOSPC\)"):
        run(tmp_path / "a", "train.epochs=2")
    assert files(tmp_path / "a") == ["metrics.csv", "metrics.jsonl", "recipe.yaml", "train.log"]  # no lock, no
    # orphaned state, no temp file
    line = one_line(capsys, main(["train", "tiny", *FAST, "train.epochs=2", "--output-dir", str(tmp_path / "b"),
                                  "--no-progress"]))
    assert "ENOSPC" in line and "step_000000004.safetensors" in line


def interrupt_at(monkeypatch, call: int, action) -> None:
    """Run ``action()`` inside the ``call``-th loss computation of the run."""
    from fusionkit.engine import trainer

    real, calls = trainer.total_loss, [0]

    def loss(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "total_loss", loss)


def test_ctrl_c_mid_step_checkpoints_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    common = ["train.epochs=1", "train.mixup=0.8", "train.accum_steps=2", "train.batch_size=4"]  # 4 steps
    full = run(tmp_path / "full", *common)

    def ctrl_c():
        raise KeyboardInterrupt

    interrupt_at(monkeypatch, 8, ctrl_c)  # micro-batch 2 of step 4: steps 1-3 are done
    with pytest.raises(KeyboardInterrupt, match=r"interrupted \(Ctrl-C\) at step 3: checkpoint .*step_000000003"):
        run(tmp_path / "part", *common)
    assert "run.lock" not in files(tmp_path / "part")
    monkeypatch.undo()
    rest = run(tmp_path / "part", *common, resume="auto")
    assert rest.losses == full.losses[3:]  # exact, step by step
    assert rows(tmp_path / "part") == rows(tmp_path / "full")  # the epoch-1 mean covers all of its steps


def test_ctrl_c_signal_finishes_the_step_checkpoints_and_exits_2(tmp_path, monkeypatch, capsys):
    before = signal.getsignal(signal.SIGINT)
    interrupt_at(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
    code = main(["train", "tiny", *FAST, "train.epochs=1", "--output-dir", str(tmp_path), "--no-progress"])
    line = one_line(capsys, code)
    assert "interrupted (Ctrl-C) at step 2" in line and "--resume" in line
    latest = CheckpointManager(tmp_path).latest()
    assert latest.name == "step_000000002.safetensors" and state_path(latest).is_file()
    assert signal.getsignal(signal.SIGINT) is before  # restored


# -- leftovers of a kill ----------------------------------------------------------------------------

def test_leftovers_of_a_kill_are_cleaned_up_on_resume(tmp_path):
    run(tmp_path, "train.epochs=1")
    (tmp_path / ".step_000000008.safetensors.4242.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".step_000000008.state.safetensors.4242.tmp").write_bytes(b"half a state")
    state = state_path(CheckpointManager(tmp_path).path(4)).read_bytes()
    (tmp_path / "step_000000008.state.safetensors").write_bytes(state)  # killed between state and weights
    with (tmp_path / "metrics.jsonl").open("a") as f:  # killed between the metrics row and its checkpoint
        f.write(json.dumps({"epoch": 2, "step": 8, "train/loss": 1.0, "lr": 0.1}) + "\n")
    write_lock(tmp_path, dead_pid())  # SIGKILL leaves its lock behind
    result = run(tmp_path, "train.epochs=2", resume="auto")
    assert result.step == 8
    assert files(tmp_path) == ["curves.png", "metrics.csv", "metrics.jsonl", "recipe.step_4.yaml", "recipe.yaml",
                               "step_000000004.safetensors", "step_000000004.state.safetensors",
                               "step_000000008.safetensors", "step_000000008.state.safetensors", "train.log"]
    assert [r["epoch"] for r in rows(tmp_path)] == [1, 2] and rows(tmp_path)[1]["train/loss"] != 1.0
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 3


def test_the_resumed_epoch_loss_averages_all_of_its_steps(tmp_path):
    full = run(tmp_path / "full", "train.epochs=1")
    run(tmp_path / "part", "train.epochs=1", "train.max_steps=1")
    rest = run(tmp_path / "part", "train.epochs=1", resume="auto")
    assert len(rest.losses) == 3
    (row,) = rows(tmp_path / "part")
    assert row["train/loss"] == rows(tmp_path / "full")[0]["train/loss"] == sum(full.losses) / 4
    assert math.isfinite(row["train/loss"])


@pytest.mark.slow
def test_sigkill_then_resume_takes_over_the_lock(tmp_path):
    """A real kill -9 mid-run: its lock and partial files stay behind; --resume continues the run."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "fusionkit", "train", "tiny", *FAST, "train.epochs=1000", "train.log_every=1",
           "train.checkpoint.every_steps=1", "--output-dir", str(tmp_path), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 3/"):
                break
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "run.lock").exists()
    done = CheckpointManager(tmp_path).latest()
    result = run(tmp_path, "train.epochs=1000", "train.max_steps=6", "train.checkpoint.every_steps=1",
                 resume="auto")
    assert result.status == "max_steps" and result.step == 6 and len(result.losses) == 6 - int(done.name[5:14])
    assert not (tmp_path / "run.lock").exists()

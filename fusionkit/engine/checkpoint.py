"""Checkpoints: safetensors weights + a safetensors/JSON training state, written atomically.

A checkpoint ``NAME`` in the run directory is two files:

* ``NAME.safetensors``: the weights (by default only the trainable tensors, e.g. CAST's adapters,
  B-CA and heads) and, in the safetensors metadata under ``fusionkit``, JSON with the format
  version, the full recipe, the build seed, the sources of the frozen experts (their ``type`` and
  ``pretrained`` entries) and a fingerprint of the frozen tensors, step, epoch and metrics. Any
  safetensors reader opens it; :func:`load_model` rebuilds the model from the recorded recipe
  and seed and loads the saved tensors over it.
* ``NAME.state.safetensors`` (training checkpoints only): optimizer moments and RNG states as
  tensors; optimizer hyper-parameters, scheduler, gradient scaler, mixup RNG and loop position as
  JSON metadata. Nothing is pickled, so loading cannot run code.

Each file is written to ``.NAME…tmp`` in the same directory, flushed, fsynced and renamed
(``os.replace``), the state first, the weights last: a ``NAME.safetensors`` on disk always comes
with its complete state. :class:`CheckpointManager` keeps the last ``keep_last`` step checkpoints
of its own run (the ``run_id`` in their state) and ``best.safetensors`` (weights only).

A run directory belongs to one run: :func:`claim_run_dir` takes its lock file ``run.lock`` (created
with ``O_EXCL``, holding the pid and host; the lock of a process that no longer exists is taken
over), refuses a new run in a directory holding another run's files and removes what a killed run
left behind (partial ``.step_*.tmp`` files and those of the run folder's metrics, ``recipe.yaml`` and
``curves.png``; a ``.state`` file whose weights were never written).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import socket
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from fusionkit.errors import FusionkitError, describe_os_error

FORMAT = "fusionkit-checkpoint/1"
STEP_NAME = re.compile(r"^step_(\d+)\.safetensors$")
STATE_NAME = re.compile(r"^step_(\d+)\.state\.safetensors$")
PARTIAL_NAME = re.compile(  # atomic_write_bytes' temp files (checkpoints, and the run folder's files)
    r"^\.((step_\d+(\.state)?|best)\.safetensors|metrics\.csv|metrics\.jsonl|recipe\.yaml|curves\.png)\.\d+\.tmp$")
LOCK_NAME = "run.lock"
RUN_FILES = ("best.safetensors", "metrics.jsonl", "metrics.csv")  # with step_* files: a run lives here


class CheckpointError(FusionkitError, RuntimeError):
    """A checkpoint that cannot be read, written, or does not fit the model."""


class RunDirError(CheckpointError):
    """A run directory that cannot be used: not writable, a file, locked by another run, holding another run."""


# -- files ---------------------------------------------------------------------------------------

def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Path:
    """Atomically write ``tensors`` (CPU, contiguous copies) with ``meta`` as JSON metadata."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return atomic_write_bytes(path, st_save(flat, metadata={k: json.dumps(v) for k, v in meta.items()}))


def _check_file(path: str | os.PathLike[str]) -> None:
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"checkpoint {p} is a directory, not a .safetensors file")
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON metadata of a safetensors file (``{}`` if none)."""
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"cannot read checkpoint {path} (not a safetensors file, or a truncated one): "
                              f"{err}") from err
    out = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def read_tensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    _check_file(path)
    try:
        return st_load(Path(path).read_bytes())
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {path} (not a safetensors file, or a truncated one): "
                              f"{err}") from err


def state_path(weights: str | os.PathLike[str]) -> Path:
    """``NAME.state.safetensors`` beside ``NAME.safetensors``."""
    p = Path(weights)
    return p.with_name(p.name[: -len(".safetensors")] + ".state.safetensors") if p.name.endswith(".safetensors") \
        else p.with_name(p.name + ".state.safetensors")


# -- model ---------------------------------------------------------------------------------------

def model_tensors(model: nn.Module, trainable_only: bool = True,
                  state: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The tensors saved for ``model``: trainable parameters only, or the whole state dict.

    ``state`` is a full state dict gathered elsewhere (FSDP); names follow ``model``'s.
    """
    state = dict(state if state is not None else model.state_dict())
    if not trainable_only:
        return state
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in names}


def frozen_fingerprint(model: nn.Module) -> str:
    """A short hash of the frozen parameters (names, shapes, sums): detects a rebuilt model that differs."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        x = p.detach().double()
        h.update(f"{name}:{tuple(p.shape)}:{float(x.sum()):.5e}:{float(x.abs().sum()):.5e};".encode())
    return h.hexdigest()[:16]


def frozen_sources(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Where the frozen experts come from: ``{expert: {type, name, pretrained}}`` from the recipe."""
    out = {}
    for name, spec in (recipe.get("experts") or {}).items():
        if spec:
            out[name] = {k: spec.get(k) for k in ("type", "name", "size", "pretrained") if k in spec}
    return out


def model_meta(model: nn.Module, recipe: Mapping[str, Any], seed: int, trainable_only: bool,
               fingerprint: str | None = None, **extra: Any) -> dict[str, Any]:
    """A checkpoint's ``fusionkit`` metadata; ``fingerprint``: the frozen experts' as built (a run that keeps
    them in bf16, ``train.frozen_precision``, took it before the cast), else computed from ``model``."""
    return {"format": FORMAT, "recipe": dict(recipe), "build_seed": int(seed), "trainable_only": bool(trainable_only),
            "frozen_sources": frozen_sources(recipe), "frozen_fingerprint": fingerprint or frozen_fingerprint(model),
            **extra}


def load_weights(model: nn.Module, path: str | os.PathLike[str], strict: bool = True) -> dict[str, Any]:
    """Load a checkpoint's tensors into ``model``; returns its ``fusionkit`` metadata.

    Every saved tensor must exist in the model with the same shape; a trainable-only checkpoint must
    cover every trainable parameter (``strict``), a full one every tensor of the state dict.
    """
    meta = read_meta(path).get("fusionkit", {})
    tensors = read_tensors(path)
    own = model.state_dict()
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise CheckpointError(f"checkpoint {path} has {len(unknown)} tensor(s) the model lacks, e.g. {unknown[:3]}; "
                              "was it written for another recipe?")
    bad = [k for k, v in tensors.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"checkpoint {path}: shape mismatch for {bad[0]!r}: saved {tuple(tensors[bad[0]].shape)}, "
                              f"model {tuple(own[bad[0]].shape)}")
    if strict:
        needed = ({n for n, p in model.named_parameters() if p.requires_grad} if meta.get("trainable_only", True)
                  else set(own))
        missing = sorted(needed - set(tensors))
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensor(s) of the model, e.g. {missing[:3]}")
    model.load_state_dict(tensors, strict=False)
    expected = meta.get("frozen_fingerprint")
    if expected and meta.get("trainable_only", True) and expected != frozen_fingerprint(model):
        import warnings

        warnings.warn(f"checkpoint {path}: the frozen experts differ from those it was trained with "
                      f"(fingerprint {frozen_fingerprint(model)} != {expected}); check the experts' pretrained "
                      f"sources {meta.get('frozen_sources')}", stacklevel=2)
    return meta


def rebuild(cfg: Mapping[str, Any], path: str | os.PathLike[str] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a loaded recipe built under the one seed rule (the checkpoint's ``build_seed``, else
    the recipe's ``train.seed``, default 0: random frozen experts come out as in training), with the
    checkpoint at ``path`` loaded when given; returns it and the checkpoint's metadata."""
    from fusionkit.engine.config import TRAIN_DEFAULTS
    from fusionkit.recipes import build_from_config

    meta = read_meta(path).get("fusionkit", {}) if path else {}
    torch.manual_seed(int(meta.get("build_seed", (cfg.get("train") or {}).get("seed", TRAIN_DEFAULTS["seed"]))))
    model = build_from_config(cfg)
    if path:
        load_weights(model, path)
    return model, meta


def load_model(path: str | os.PathLike[str], recipe: Any = None, overrides: tuple[str, ...] = ()) -> nn.Module:
    """Rebuild the model of a checkpoint (its recorded recipe, or ``recipe``) and load it (:func:`rebuild`)."""
    from fusionkit.recipes import load_recipe

    if recipe is None:
        meta = read_meta(path).get("fusionkit", {})
        if "recipe" not in meta:
            raise CheckpointError(f"checkpoint {path} records no recipe; pass one")
        recipe = meta["recipe"]
    return rebuild(load_recipe(recipe, overrides), path)[0]


# -- training state ------------------------------------------------------------------------------

def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer state dict → (tensors, JSON) without pickle."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Torch (CPU and CUDA) RNG states as tensors; Python's as JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def set_rng_state(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
    cuda = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v.to(torch.uint8) for _, v in cuda][: torch.cuda.device_count()])
    if "python" in meta:
        version, internal, gauss = meta["python"]
        random.setstate((version, tuple(internal), gauss))


class CheckpointManager:
    """Writes ``step_<N>`` checkpoints in a run directory, keeps the last few and the best.

    Args:
        directory: run directory (created).
        keep_last: step checkpoints kept (older ones are deleted with their state).
        mode: ``max`` or ``min`` for the best metric.
        run_id: the run's id, recorded in the state of its checkpoints (``state_meta["run_id"]``):
            pruning deletes only checkpoints of this run. ``None``: every step checkpoint counts.
    """

    def __init__(self, directory: str | os.PathLike[str], keep_last: int = 3, mode: str = "max",
                 run_id: str | None = None) -> None:
        self.directory = Path(directory)
        self.keep_last, self.mode = int(keep_last), mode
        self.best: float | None = None
        self.run_id = run_id
        self._owner: dict[Path, str | None] = {}  # checkpoint -> run id (read once)

    def path(self, step: int) -> Path:
        return self.directory / f"step_{step:09d}.safetensors"

    def steps(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := STEP_NAME.match(p.name))]
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete step checkpoint (weights and state), or None."""
        for _, p in reversed(self.steps()):
            if state_path(p).is_file():
                return p
        return None

    def owns(self, path: Path) -> bool:
        """Whether step checkpoint ``path`` belongs to this manager's run."""
        if self.run_id is None:
            return True
        if path not in self._owner:
            try:
                self._owner[path] = read_meta(state_path(path)).get("state", {}).get("run_id")
            except CheckpointError:  # no readable state: not a checkpoint of a run
                self._owner[path] = None
        return self._owner[path] == self.run_id

    def save(self, step: int, weights: Mapping[str, Tensor], meta: Mapping[str, Any],
             state_tensors: Mapping[str, Tensor] | None = None, state_meta: Mapping[str, Any] | None = None) -> Path:
        """Write ``step_<step>`` (state first, then weights), then delete checkpoints beyond ``keep_last``.

        A write that fails (disk full, permission) leaves no part of this checkpoint behind and raises
        a :class:`CheckpointError` naming the file, the reason and the last complete checkpoint.
        """
        path = self.path(step)
        state_meta = dict(state_meta or {})
        if self.run_id is not None:
            state_meta.setdefault("run_id", self.run_id)
        files = [state_path(path), path] if state_tensors is not None else [path]
        existed = {f: f.exists() for f in files}
        try:
            if state_tensors is not None:
                save_tensors(state_path(path), state_tensors, {"state": state_meta})
            save_tensors(path, weights, {"fusionkit": dict(meta)})
        except OSError as err:
            for f in files:  # a half-written step is not a checkpoint
                if not existed[f]:
                    with contextlib.suppress(OSError):
                        f.unlink()
            latest = self.latest()
            raise CheckpointError(f"cannot write checkpoint {path}: {describe_os_error(err)}; the last complete "
                                  f"checkpoint is {latest if latest else '(none)'}") from err
        self._owner[path] = self.run_id
        self.prune()
        return path

    def prune(self) -> None:
        """Delete this run's step checkpoints beyond ``keep_last`` and state files without weights."""
        own = [p for _, p in self.steps() if self.owns(p)]
        for p in own[: -self.keep_last]:
            for f in (p, state_path(p)):
                if f.exists():
                    f.unlink()
            self._owner.pop(p, None)
        remove_orphaned_states(self.directory)

    def is_better(self, value: float | None) -> bool:
        if value is None or value != value:  # NaN never wins
            return False
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def save_best(self, value: float, weights: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Path | None:
        """Write ``best.safetensors`` if ``value`` beats the best so far."""
        if not self.is_better(value):
            return None
        path = self.directory / "best.safetensors"
        try:
            written = save_tensors(path, weights, {"fusionkit": dict(meta)})
        except OSError as err:
            raise CheckpointError(f"cannot write the best checkpoint {path}: {describe_os_error(err)}") from err
        self.best = float(value)
        return written

    def supersede(self, step: int) -> list[Path]:
        """Move the checkpoints after ``step`` (an abandoned continuation, when resuming from an older
        checkpoint) to ``superseded/``, so that pruning and ``--resume`` see this run's line only."""
        later = [p for s, p in self.steps() if s > step]
        moved = []
        if later:
            aside = self.directory / "superseded"
            aside.mkdir(exist_ok=True)
            for p in later:
                for f in (p, state_path(p)):
                    if f.exists():
                        os.replace(f, aside / f.name)
                moved.append(aside / p.name)
        return moved


# -- run directories -----------------------------------------------------------------------------

def remove_orphaned_states(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete ``step_N.state.safetensors`` files whose ``step_N.safetensors`` does not exist (a write
    interrupted between the two files); returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for f in directory.iterdir():
        m = STATE_NAME.match(f.name)
        if m and not (directory / f"step_{m.group(1)}.safetensors").exists():
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
            removed.append(f)
    return removed


def remove_partial_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files of checkpoint writes that never finished (``.step_*.tmp``)."""
    directory = Path(directory)
    removed = [f for f in directory.iterdir() if PARTIAL_NAME.match(f.name)] if directory.is_dir() else []
    for f in removed:
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    return removed


def run_files(directory: str | os.PathLike[str]) -> list[str]:
    """The files of a run in ``directory``: step checkpoints, ``best.safetensors``, metrics."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(f.name for f in directory.iterdir()
                  if STEP_NAME.match(f.name) or STATE_NAME.match(f.name) or f.name in RUN_FILES)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``DIR/run.lock``: at most one run writes into a run directory.

    The file is created with ``O_EXCL`` and holds ``{"pid", "host", "started"}``. A lock whose process
    no longer exists on this host (a killed run) is taken over; a lock of another host is respected
    (delete the file by hand if that run is gone).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.held = False

    def holder(self) -> dict[str, Any] | None:
        """The lock file's content, ``None`` when it is missing or unreadable."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _stale(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:  # empty / unreadable: stale unless it is being written right now
            try:
                return time.time() - self.path.stat().st_mtime > 10
            except FileNotFoundError:
                return True
        if holder.get("host") != socket.gethostname():
            return False
        return not _process_alive(int(holder.get("pid", -1)))

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
        self.held = True
        return True

    def _take_over(self, stale: dict[str, Any] | None) -> None:
        """Remove the stale lock: moved aside first, so one of several racing takers wins; a lock that
        turns out to be another's fresh one is put back."""
        aside = self.path.with_name(f".{LOCK_NAME}.{os.getpid()}.stale")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if moved is not None and moved != stale:  # a racing run's new lock: give it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink()

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunDirError` naming its holder."""
        try:
            for _ in range(3):
                if self._create():
                    return
                holder = self.holder()
                if not self._stale(holder):
                    break
                self._take_over(holder)
        except OSError as err:
            raise RunDirError(f"cannot write to the run directory {self.path.parent}: {describe_os_error(err)}") \
                from err
        holder = self.holder() or {}
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
        raise RunDirError(f"run directory {self.path.parent} is in use by another run ({who}, lock file "
                          f"{self.path}); wait for it to end, or pass another --output-dir")

    def release(self) -> None:
        if self.held:
            self.held = False
            holder = self.holder()
            if holder is not None and holder.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()


def claim_run_dir(directory: str | os.PathLike[str], new_run: bool) -> RunLock:
    """Make ``directory`` this run's: create it, take its lock, remove a killed run's leftovers and,
    for a ``new_run``, refuse a directory that already holds a run. Returns the held lock."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise RunDirError(f"--output-dir {directory} is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"cannot create the run directory {directory}: {describe_os_error(err)}") from err
    if not os.access(directory, os.W_OK | os.X_OK):
        raise RunDirError(f"run directory {directory} is not writable")
    lock = RunLock(directory)
    lock.acquire()
    try:
        found = run_files(directory)
        if new_run and found:  # refused before anything in it is touched
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise RunDirError(f"run directory {directory} already holds a run ({shown}); continue it with --resume, "
                              "or pass a fresh --output-dir")
        remove_partial_files(directory)
        remove_orphaned_states(directory)
    except BaseException:
        lock.release()
        raise
    return lock


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]

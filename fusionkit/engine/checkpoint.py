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
and ``best.safetensors`` (weights only).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

FORMAT = "fusionkit-checkpoint/1"
STEP_NAME = re.compile(r"^step_(\d+)\.safetensors$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


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


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON metadata of a safetensors file (``{}`` if none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    out = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def read_tensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    try:
        return st_load(Path(path).read_bytes())
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err


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
               **extra: Any) -> dict[str, Any]:
    return {"format": FORMAT, "recipe": dict(recipe), "build_seed": int(seed), "trainable_only": bool(trainable_only),
            "frozen_sources": frozen_sources(recipe), "frozen_fingerprint": frozen_fingerprint(model), **extra}


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


def load_model(path: str | os.PathLike[str], recipe: Any = None, overrides: tuple[str, ...] = ()) -> nn.Module:
    """Rebuild the model of a checkpoint (its recorded recipe and seed, or ``recipe``) and load it."""
    from fusionkit.recipes import build_from_config, load_recipe

    meta = read_meta(path).get("fusionkit", {})
    if recipe is None:
        if "recipe" not in meta:
            raise CheckpointError(f"checkpoint {path} records no recipe; pass one")
        recipe = meta["recipe"]
    cfg = load_recipe(recipe, overrides)
    torch.manual_seed(int(meta.get("build_seed", 0)))
    model = build_from_config(cfg)
    load_weights(model, path)
    return model


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
    """

    def __init__(self, directory: str | os.PathLike[str], keep_last: int = 3, mode: str = "max") -> None:
        self.directory = Path(directory)
        self.keep_last, self.mode = int(keep_last), mode
        self.best: float | None = None

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

    def save(self, step: int, weights: Mapping[str, Tensor], meta: Mapping[str, Any],
             state_tensors: Mapping[str, Tensor] | None = None, state_meta: Mapping[str, Any] | None = None) -> Path:
        """Write ``step_<step>`` (state first, then weights), then delete checkpoints beyond ``keep_last``."""
        path = self.path(step)
        if state_tensors is not None:
            save_tensors(state_path(path), state_tensors, {"state": dict(state_meta or {})})
        save_tensors(path, weights, {"fusionkit": dict(meta)})
        self.prune()
        return path

    def prune(self) -> None:
        for _, p in self.steps()[: -self.keep_last]:
            for f in (p, state_path(p)):
                if f.exists():
                    f.unlink()

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
        self.best = float(value)
        return save_tensors(self.directory / "best.safetensors", weights, {"fusionkit": dict(meta)})

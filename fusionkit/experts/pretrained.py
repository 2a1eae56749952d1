"""Loading pretrained expert weights from local files (or the hub when the machine is online).

``pretrained:`` in a recipe is either a path to a local file in the model's own layout
(``.safetensors``, ``.pth``/``.pt``/``.bin``, ``.npz`` for timm), a Hugging Face
``save_pretrained`` folder (:func:`read_hf_folder`), or a hub name. Offline (``HF_HUB_OFFLINE=1``)
a hub name fails at once with a message saying what to pass instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any
from pathlib import Path

import torch
from torch import Tensor, nn

from fusionkit.errors import FusionkitError

StateDict = dict[str, Tensor]

FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz", ".ckpt")
WRAPPER_KEYS = ("model", "module", "state_dict", "model_state")
# a Hugging Face save_pretrained folder: a shard index (read first) or one weight file, in this order
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin",
                   "open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's push_to_hf_hub


class PretrainedError(FusionkitError, RuntimeError):
    """Pretrained weights could not be found, read or matched to the model."""


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_local_file(spec: str) -> bool:
    """Whether ``spec`` names a local file rather than a hub name (``owner/name`` or a tag).

    A spec is a local file when it exists, ends with a weight-file suffix, or is not of the
    form ``name`` / ``owner/name`` (``./x``, ``/abs/path``, ``a/b/c``).
    """
    return os.path.exists(spec) or spec.endswith(FILE_SUFFIXES) or not _HUB_NAME.match(spec)


def require_online(spec: str, what: str) -> None:
    """Fail at once, naming the alternative, when ``spec`` would need the hub but we are offline."""
    if is_offline():
        raise PretrainedError(
            f"{what}: pretrained={spec!r} is a hub name but HF_HUB_OFFLINE is set, so nothing can be "
            "downloaded; pass a local weight file instead (pretrained=/path/to/weights.safetensors)")


def hub_download(repo: str, what: str, filenames: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")) -> str:
    """Download the first of ``filenames`` that hub repository ``repo`` has (online machines only)."""
    require_online(repo, what)
    from huggingface_hub import hf_hub_download

    errors = []
    for filename in filenames:
        try:
            return hf_hub_download(repo, filename)
        except Exception as err:  # noqa: BLE001 - try the next file, report all
            errors.append(f"{filename}: {err}")
    raise PretrainedError(f"{what}: cannot download pretrained={repo!r} from the hub: " + "; ".join(errors))


def unwrap_state_dict(obj: Any, error: type[Exception] = PretrainedError) -> StateDict:
    """A flat ``{key: tensor}`` from a loaded checkpoint: unwraps ``model``/``module``/``state_dict``/
    ``model_state`` (nested too), strips a DDP ``module.`` prefix and drops non-tensor entries."""
    sd = obj
    while isinstance(sd, Mapping):
        inner = next((sd[k] for k in WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, Mapping):
        raise error(f"expected a state dict (a mapping of names to tensors), got a {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, Tensor)}


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """Read a checkpoint file (``.safetensors`` or a torch file) or a Hugging Face ``save_pretrained``
    folder (:func:`read_hf_folder`) into a flat ``{key: tensor}`` (:func:`unwrap_state_dict`).
    Never unpickles arbitrary objects: torch files load with ``weights_only=True``, allowing only
    the ``argparse.Namespace`` that training scripts save."""
    path = Path(path)
    if path.is_dir():
        return read_hf_folder(path)
    if not path.is_file():
        raise PretrainedError(f"weight file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path))
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise PretrainedError(f"cannot read weights {str(path)!r}: {err}") from err
    try:
        return unwrap_state_dict(raw)
    except PretrainedError as err:
        raise PretrainedError(f"{str(path)!r}: {err}") from err


def read_hf_folder(folder: str | os.PathLike[str]) -> StateDict:
    """One flat state dict from a Hugging Face ``save_pretrained`` folder: the shards named by the
    ``weight_map`` of ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``
    (``model-00001-of-00002.safetensors``, ...), merged, or else the first of ``model.safetensors``,
    ``pytorch_model.bin``, ``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin``."""
    folder = Path(folder)
    index = next((folder / name for name in HF_INDEX_FILES if (folder / name).is_file()), None)
    if index is not None:
        return _read_shards(index)
    single = next((folder / name for name in HF_WEIGHT_FILES if (folder / name).is_file()), None)
    if single is None:
        raise PretrainedError(f"weight folder {str(folder)!r} holds no weights: expected a Hugging Face "
                              f"save_pretrained folder with one of {', '.join(HF_INDEX_FILES + HF_WEIGHT_FILES)}")
    return read_state_dict(single)


def _read_shards(index: Path) -> StateDict:
    """The shards that the ``weight_map`` of ``index`` lists, read and merged (all must exist)."""
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise PretrainedError(f"cannot read the shard index {str(index)!r} (a JSON object with a "
                              f"'weight_map' of key -> shard file): {type(err).__name__}: {err}") from err
    missing = [name for name in shards if not (index.parent / name).is_file()]
    if missing:
        raise PretrainedError(f"weight folder {str(index.parent)!r}: {index.name} lists {len(shards)} shards "
                              f"but {len(missing)} are missing: {', '.join(missing)}")
    merged: StateDict = {}
    for name in shards:
        merged.update(read_state_dict(index.parent / name))
    return merged


def load_into(module: nn.Module, state_dict: StateDict, source: str, ignore: Callable[[str], bool] | None = None) -> None:
    """Load ``state_dict`` strictly into ``module``; the error lists missing, unexpected and
    mis-shaped keys with expected and actual shapes. ``ignore(key)`` drops keys of the source that
    the expert does not use (e.g. a classifier head)."""
    if ignore is not None:
        state_dict = {k: v for k, v in state_dict.items() if not ignore(k)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(v.shape)}"
              for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or shapes:
        lines = [f"pretrained weights from {source} do not match {type(module).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                lines.append(f"  {title} ({len(items)}): {', '.join(items[:8])}{more}")
        raise PretrainedError("\n".join(lines))
    module.load_state_dict(state_dict, strict=True)

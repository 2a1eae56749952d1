"""The engine's recipe sections: ``data``, ``train`` and ``eval``, with defaults and validation.

Every key has a default here (documented in ``docs/engine.md``); an unknown key fails with one line
naming the closest valid key (:func:`fusionkit.recipes.check_keys`), before anything is built.
Dataset specs (``data.train``, ``data.val``) are checked against the registered dataset's
constructor like every other registered section of a recipe.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from fusionkit.recipes import RecipeError, accepted_keys, check_keys

CHECKPOINT_DEFAULTS: dict[str, Any] = {
    "every_epochs": 1,          # write a checkpoint after every N epochs (0: only at the end)
    "every_steps": 0,           # also every N optimizer steps (0: off)
    "keep_last": 3,             # keep the last N step/epoch checkpoints (best and final kept aside)
    "keep_best": True,          # keep best.safetensors by `monitor`
    "monitor": None,            # metric key for best (None: action/top1, else the first head's top1)
    "mode": "max",              # max or min
    "trainable_only": True,     # save trainable tensors only (frozen experts rebuilt from the recipe)
}

DISTRIBUTED_DEFAULTS: dict[str, Any] = {
    "backend": "auto",          # auto (nccl on CUDA, gloo on CPU), nccl, gloo
    "fsdp": False,              # shard the model with FSDP instead of DDP (large experts)
    "find_unused_parameters": "auto",  # auto: on only when some trainable parameter gets no gradient
                                       # (fusionkit.engine.unused), true, false
    "timeout_s": 1800,
}

TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 50,
    "max_steps": None,          # stop after this many optimizer steps in total (resume continues)
    "batch_size": 6,            # per process
    "accum_steps": 1,           # gradient accumulation: micro-batches per optimizer step
    "num_workers": 4,
    "seed": 0,
    "device": "auto",           # auto (cuda if available), cpu, cuda, cuda:1
    "base_lr": 1e-3,            # scaled by total batch / lr_batch (total = batch * accum * world)
    "lr_batch": 256,
    "lr": None,                 # absolute peak lr (no scaling) if set
    "min_lr": 1e-6,
    "warmup_epochs": 5.0,
    "warmup_steps": None,       # overrides warmup_epochs
    "warmup_lr": 1e-6,
    "schedule": "cosine",       # cosine, constant
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "weight_decay": 0.05,
    "no_weight_decay": [],      # more fnmatch patterns without decay; 1-D tensors (norms, biases) and what the
                                # modules declare in no_weight_decay() (position embeddings, CLS tokens) never decay
    "layer_decay": 0.75,        # layer-wise lr decay (1.0: off)
    "head_lr_scale": 1.0,       # extra lr factor of the heads
    "clip_grad": None,          # max gradient norm (None: off)
    "precision": "fp32",        # fp32, bf16, fp16 (autocast; fp16 uses a gradient scaler)
    "frozen_precision": None,   # bf16 / fp16: frozen Linear / Conv weights stored in it once (= precision)
    "recompute_experts": False,  # activation checkpointing of the experts' steps: true or keep_attention
    "compile": False,           # torch.compile the model for training (the first step compiles; logged)
    "label_smoothing": None,    # None: keep each head's own; a value overrides every single-label head
    "mixup": 0.0,               # Beta(alpha, alpha) mixup of video and audio together (0: off)
    "mixup_prob": 1.0,
    "loss_weights": {},         # head -> weight of its loss
    "nonfinite": "stop",        # stop (error naming the step) or skip (drop the step's update)
    "max_nonfinite_fraction": 0.5,  # nonfinite=skip: more than this fraction of an epoch's steps skipped is an error
    "max_skipped_fraction": 1.0,  # more than this fraction of an epoch's clips undecodable is an error (1.0: only
                                  # an epoch whose every clip is undecodable)
    "log_every": 10,
    "eval_every": 1,            # validate every N epochs (0: never)
    "output_dir": None,         # default runs/<recipe name>
    "checkpoint": CHECKPOINT_DEFAULTS,
    "distributed": DISTRIBUTED_DEFAULTS,
    "action": None,             # heads whose joint top-1 is action/top1 (EK100: [verb, noun]); None: no action metric
}

EVAL_DEFAULTS: dict[str, Any] = {
    "batch_size": 8,
    "num_workers": 4,
    "precision": None,          # None: train.precision
    "split": "val",             # data section evaluated by `fusionkit eval`
    "ks": [1, 5],
    "topk": 5,                  # predictions listed by `fusionkit predict`
    "ensemble": None,           # {label: {heads: [...], combine: softmax|logits|sigmoid}}: test-time ensemble
}

DATA_KEYS = ("train", "val", "test")
PRECISIONS = ("fp32", "bf16", "fp16")


def _merge(path: str, given: Mapping[str, Any] | None, defaults: Mapping[str, Any], what: str) -> dict[str, Any]:
    given = dict(given or {})
    check_keys(path, given, list(defaults), what)
    out = copy.deepcopy(dict(defaults))
    for key, value in given.items():
        if isinstance(defaults[key], Mapping) and key not in ("loss_weights",):
            out[key] = _merge(f"{path}.{key}", value, defaults[key], f"{path}.{key}")
        else:
            out[key] = value
    return out


def _positive(path: str, value: Any, zero_ok: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if zero_ok else value > 0)
    if not ok:
        raise RecipeError(f"recipe key {path!r} must be {'non-negative' if zero_ok else 'positive'}, got {value!r}")


def train_config(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The ``train`` section with every default filled in, validated."""
    cfg = _merge("train", recipe.get("train"), TRAIN_DEFAULTS, "the train section")
    for key in ("epochs", "batch_size", "accum_steps", "log_every"):
        _positive(f"train.{key}", cfg[key])
    for key in ("num_workers", "base_lr", "min_lr", "weight_decay", "warmup_epochs", "mixup", "eval_every",
                "warmup_lr"):
        _positive(f"train.{key}", cfg[key], zero_ok=True)
    if cfg["max_steps"] is not None:
        _positive("train.max_steps", cfg["max_steps"], zero_ok=True)
    if not 0 < float(cfg["layer_decay"]) <= 1:
        raise RecipeError(f"recipe key 'train.layer_decay' must lie in (0, 1], got {cfg['layer_decay']!r}")
    if cfg["precision"] not in PRECISIONS:
        raise RecipeError(f"recipe key 'train.precision' must be one of {', '.join(PRECISIONS)}, "
                          f"got {cfg['precision']!r}")
    if cfg["frozen_precision"] not in (None, "fp32", cfg["precision"]):
        raise RecipeError(f"recipe key 'train.frozen_precision' is {cfg['frozen_precision']!r} but train.precision "
                          f"is {cfg['precision']!r}: frozen weights are kept in the precision autocast computes in "
                          f"(set both to {cfg['frozen_precision']!r})")
    if not isinstance(cfg["compile"], bool):
        raise RecipeError(f"recipe key 'train.compile' must be true or false, got {cfg['compile']!r}")
    if not (isinstance(cfg["recompute_experts"], bool) or cfg["recompute_experts"] == "keep_attention"):
        raise RecipeError("recipe key 'train.recompute_experts' must be true, false or keep_attention (recompute "
                          f"all but the attention kernels' outputs), got {cfg['recompute_experts']!r}")
    if cfg["nonfinite"] not in ("stop", "skip"):
        raise RecipeError(f"recipe key 'train.nonfinite' must be 'stop' or 'skip', got {cfg['nonfinite']!r}")
    if cfg["schedule"] not in ("cosine", "constant"):
        raise RecipeError(f"recipe key 'train.schedule' must be 'cosine' or 'constant', got {cfg['schedule']!r}")
    if not 0 <= float(cfg["mixup_prob"]) <= 1:
        raise RecipeError(f"recipe key 'train.mixup_prob' must lie in [0, 1], got {cfg['mixup_prob']!r}")
    if cfg["clip_grad"] is not None:
        _positive("train.clip_grad", cfg["clip_grad"])
    if cfg["checkpoint"]["mode"] not in ("max", "min"):
        raise RecipeError(f"recipe key 'train.checkpoint.mode' must be 'max' or 'min', got {cfg['checkpoint']['mode']!r}")
    _positive("train.checkpoint.keep_last", cfg["checkpoint"]["keep_last"])
    if cfg["distributed"]["find_unused_parameters"] not in ("auto", True, False):
        raise RecipeError("recipe key 'train.distributed.find_unused_parameters' must be auto, true or false, got "
                          f"{cfg['distributed']['find_unused_parameters']!r}")
    heads = set((recipe.get("heads") or {}))
    unknown = sorted(set(cfg["loss_weights"]) - heads) if heads else []
    if unknown:
        raise RecipeError(f"recipe key 'train.loss_weights' names unknown head(s) {unknown}; heads: {sorted(heads)}")
    return cfg


def eval_config(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The ``eval`` section with every default filled in, validated."""
    cfg = _merge("eval", recipe.get("eval"), EVAL_DEFAULTS, "the eval section")
    _positive("eval.batch_size", cfg["batch_size"])
    _positive("eval.num_workers", cfg["num_workers"], zero_ok=True)
    if cfg["precision"] is not None and cfg["precision"] not in PRECISIONS:
        raise RecipeError(f"recipe key 'eval.precision' must be one of {', '.join(PRECISIONS)}, "
                          f"got {cfg['precision']!r}")
    if cfg["split"] not in DATA_KEYS:
        raise RecipeError(f"recipe key 'eval.split' must be one of {', '.join(DATA_KEYS)}, got {cfg['split']!r}")
    return cfg


def check_frozen_precision(train: Mapping[str, Any], evaluation: Mapping[str, Any]) -> None:
    """``train.frozen_precision`` needs the in-training validation to run in that precision too (its
    weights are stored in it) and is not combined with FSDP (which re-shards the parameters)."""
    frozen = train["frozen_precision"]
    if frozen in (None, "fp32"):
        return
    if (evaluation["precision"] or train["precision"]) != frozen:
        raise RecipeError(f"recipe key 'eval.precision' is {evaluation['precision']!r} but train.frozen_precision is "
                          f"{frozen!r}: validation during training runs on the same weights (leave eval.precision "
                          "null, or set it to the same)")
    if train["distributed"]["fsdp"]:
        raise RecipeError("recipe key 'train.frozen_precision' is not supported with train.distributed.fsdp")


def dataset_specs(recipe: Mapping[str, Any], split: str) -> dict[str, dict[str, Any]]:
    """The dataset specs of one split of the ``data`` section, by name.

    A split is one spec (``{type: manifest, ...}``, named after the split) or a mapping of named
    specs (several validation sets: metrics per set and their harmonic mean). Empty if absent.
    """
    data = recipe.get("data") or {}
    check_keys("data", data, DATA_KEYS, "the data section")
    entry = data.get(split)
    if entry is None:
        return {}
    if not isinstance(entry, Mapping):
        raise RecipeError(f"recipe key 'data.{split}' must be a dataset spec {{type: ..., ...}} or a mapping of them")
    specs = {split: dict(entry)} if "type" in entry else {str(k): dict(v) for k, v in entry.items() if v is not None}
    for name, spec in specs.items():
        check_dataset_spec(f"data.{split}" if name == split else f"data.{split}.{name}", spec)
    return specs


def check_dataset_spec(path: str, spec: Mapping[str, Any]) -> type:
    """Validate a dataset spec against the registered dataset's constructor; returns the class."""
    from fusionkit.registry import DATASETS

    if not isinstance(spec, Mapping) or "type" not in spec:
        raise RecipeError(f"recipe key {path!r} needs a 'type' (one of: {', '.join(DATASETS.names())})")
    try:
        cls = DATASETS.get(spec["type"])
    except KeyError as err:
        raise RecipeError(f"{path}.type: {err}") from err
    names, var_kw = accepted_keys(cls)
    if not var_kw:
        check_keys(path, {k: v for k, v in spec.items() if k != "type"}, ["type", *names],
                   f"dataset {spec['type']!r} ({cls.__name__})")
    return cls

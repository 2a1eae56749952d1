"""Evaluation: metrics of a model over one or several data sets, synchronised over ranks.

Each rank scores its shard (no padding, no shuffle); logits, targets and clip ids are gathered on
every rank and scored by :class:`fusionkit.metrics.MetricTracker` (views of one clip averaged by
``clip_id``): ``<head>/top1``, ``<head>/top5``, ``<head>/mca``, ``action/top1`` (the joint top-1 of the
heads the recipe's ``train.action`` names), ``num_samples``.
With several data sets each metric is reported per set (``<set>/<metric>``) and, for metrics every
set has, as the harmonic mean across sets (``hmean/<metric>``).

Robustness (``fusionkit eval --corrupt SPEC ...``, :func:`run_robustness`): the same metrics clean and
under each corruption of :mod:`fusionkit.data.corrupt`, set on the datasets in turn; one table, a row
per condition with its change from clean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from rich.table import Table
from torch import nn

from fusionkit.data.corrupt import Corruption, parse_all
from fusionkit.engine import distributed
from fusionkit.engine.device import autocast, pick_device
from fusionkit.engine.loading import build_dataset, check_modalities, make_loader, to_device
from fusionkit.engine.progress import Reporter, fmt
from fusionkit.errors import DataError, UsageError
from fusionkit.engine.ensemble import ensemble
from fusionkit.metrics import MetricTracker, harmonic_mean

ROBUSTNESS_MEMO_GB = 8.0  # decoded clips kept in memory across the conditions of `eval --corrupt`


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, precision: str = "fp32",
             action: Sequence[str] | None = None, ks: Sequence[int] = (1, 5),
             on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
    """Metrics of ``model`` over ``loader`` (every rank's shard gathered first); ``skipped`` counts
    undecodable items; ``action`` names the heads of ``action/top1`` (``None``: no such metric). A recipe
    with ``eval.ensemble`` is scored on its ensemble groups (:func:`fusionkit.engine.ensemble.ensemble`, each
    group named after the label it predicts)."""
    was_training = model.training
    model.eval()
    net = distributed.unwrap(model)
    heads = getattr(net, "heads", {})
    groups = ((getattr(net, "recipe", None) or {}).get("eval") or {}).get("ensemble")  # test-time ensemble
    logits_all: dict[str, list[torch.Tensor]] = {}
    targets_all: dict[str, list[torch.Tensor]] = {}
    ids: list[Any] = []
    skipped, first_skip = 0, None
    for batch in loader:
        skipped += len(batch.get("skipped") or [])
        first_skip = first_skip or next(iter(batch.get("skipped") or []), None)
        inputs, targets = to_device(batch, device)
        if on_batch is not None:
            on_batch(len(batch.get("clip_id") or []))
        if not inputs or not targets or next(iter(inputs.values())).shape[0] == 0:
            continue
        with autocast(device, precision):
            out = model(inputs)
        if groups:
            out = ensemble({h: x.float() for h, x in out.items()}, groups)
        for h, x in out.items():
            label = h if groups or h not in heads else getattr(heads[h], "target", None) or h
            logits_all.setdefault(h, []).append(x.detach().float().cpu())
            targets_all.setdefault(h, []).append(targets[label].cpu())
        ids.extend(batch.get("clip_id") or [None] * next(iter(out.values())).shape[0])
    model.train(was_training)
    local = ({h: torch.cat(v) for h, v in logits_all.items()}, {h: torch.cat(v) for h, v in targets_all.items()}, ids,
             skipped)
    parts = distributed.gather_objects(local)
    if groups:  # the tracked "heads" are the ensemble groups
        heads = {g: SimpleNamespace(multilabel=isinstance(spec, Mapping) and spec.get("combine") == "sigmoid")
                 for g, spec in groups.items()}
    tracker = MetricTracker.for_heads(heads, ks=ks, action=tuple(action) if action else None)
    with_ids = all(i is not None for p in parts for i in p[2])
    for logits, targets, clip_ids, _ in parts:
        if logits:
            tracker.update(logits, targets, clip_ids=clip_ids if with_ids else None)
    total_skipped = sum(p[3] for p in parts)
    if not len(tracker):
        if total_skipped:  # every clip undecodable: no metric, not a "0 %" that could pick a best model
            example = f", e.g. {first_skip[0]}: {first_skip[1]}" if first_skip else ""
            raise DataError(f"every one of its {total_skipped} clips failed to decode{example}")
        return {"num_samples": 0.0, "skipped": float(total_skipped)}
    out = tracker.compute()
    out["skipped"] = float(total_skipped)
    return out


def combine(per_set: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Flatten ``{set: metrics}``: one set keeps its keys; several get ``<set>/<key>`` and ``hmean/<key>``."""
    if len(per_set) == 1:
        return dict(next(iter(per_set.values())))
    out: dict[str, float] = {}
    for name, metrics in per_set.items():
        out.update({f"{name}/{k}": v for k, v in metrics.items()})
    common = set.intersection(*(set(m) for m in per_set.values())) - {"num_samples", "skipped"}
    for key in sorted(common):
        values = [per_set[s][key] for s in per_set]
        if all(v == v and v >= 0 for v in values):
            out[f"hmean/{key}"] = harmonic_mean(values)
    return out


def eval_loaders(specs: Mapping[str, Mapping[str, Any]], batch_size: int, num_workers: int, seed: int = 0,
                 split: str = "val") -> dict[str, Any]:
    """One loader per named dataset spec, sharded over ranks without padding."""
    loaders = {}
    for name, spec in specs.items():
        dataset = build_dataset(spec, f"data.{split}" if name == split else f"data.{split}.{name}")
        sampler = distributed.ShardedSampler(len(dataset), shuffle=False, seed=seed, pad=False)
        loaders[name] = make_loader(dataset, batch_size, sampler, num_workers, seed, drop_last=False)
    return loaders


def evaluate_sets(model: nn.Module, loaders: Mapping[str, Any], device: torch.device, precision: str = "fp32",
                  action: Sequence[str] | None = None, ks: Sequence[int] = (1, 5),
                  on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
    """:func:`evaluate` on every loader, combined by :func:`combine`; a set whose every clip is
    undecodable raises :class:`~fusionkit.errors.DataError` naming the set."""
    per_set = {}
    for name, loader in loaders.items():
        try:
            per_set[name] = evaluate(model, loader, device, precision, action, ks, on_batch)
        except DataError as err:
            raise DataError(f"evaluation set {name!r}: {err}") from err
    return combine(per_set)


def default_monitor(metrics: Mapping[str, float]) -> str | None:
    """The metric that picks the best checkpoint: action top-1, else the first head's top-1."""
    for key in ("hmean/action/top1", "action/top1"):
        if key in metrics:
            return key
    tops = sorted(k for k in metrics if k.endswith("/top1"))
    hmeans = [k for k in tops if k.startswith("hmean/")]
    return (hmeans or tops or [None])[0]


def model_for(recipe: Mapping[str, Any], checkpoint: str | None, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``recipe``'s model (with the checkpoint's build seed, so random frozen experts match) and load
    ``checkpoint`` into it; returns the model (eval mode, on ``device``) and the checkpoint metadata."""
    from fusionkit.engine.checkpoint import rebuild

    model, meta = rebuild(recipe, checkpoint)
    return model.to(device).eval(), meta


def evaluate_conditions(model: nn.Module, loaders: Mapping[str, Any], corruptions: Sequence[Corruption],
                        device: torch.device, precision: str = "fp32", action: Sequence[str] | None = None,
                        ks: Sequence[int] = (1, 5), on_batch: Callable[[int], None] | None = None
                        ) -> dict[str, dict[str, float]]:
    """:func:`evaluate_sets` clean, then under each corruption (set as every loader's ``dataset.corruption``
    in turn, reset afterwards): ``{"clean": metrics, spec: metrics, ...}``."""
    results = {"clean": evaluate_sets(model, loaders, device, precision, action, ks, on_batch)}
    try:
        for corruption in corruptions:
            _corrupt(loaders, corruption)
            results[corruption.spec] = evaluate_sets(model, loaders, device, precision, action, ks, on_batch)
    finally:
        if corruptions:
            _corrupt(loaders, None)
    return results


def _corrupt(loaders: Mapping[str, Any], corruption: Corruption | None) -> None:
    for loader in loaders.values():
        loader.dataset.corruption = corruption


def share_decoding(loaders: Mapping[str, Any], split: str) -> None:
    """Check that every set can be corrupted, and let one without a decoded-media memo keep up to
    :data:`ROBUSTNESS_MEMO_GB` of decoded clips in memory, so the conditions decode each clip once."""
    for name, loader in loaders.items():
        dataset = loader.dataset
        if not hasattr(dataset, "corruption"):
            where = f"data.{split}" if name == split else f"data.{split}.{name}"
            raise UsageError(f"--corrupt: {where} ({type(dataset).__name__}) cannot be corrupted: corruptions act "
                             "on decoded media (a manifest dataset)")
        if getattr(dataset, "decoded_cache_gb", None) == 0 and getattr(dataset, "decoded_cache_dir", None) is None:
            dataset.decoded_cache_gb = ROBUSTNESS_MEMO_GB


def robustness_table(title: str, results: Mapping[str, Mapping[str, float]]) -> Table:
    """One row per condition, one column per metric (headers broken after each ``/``); corrupted cells
    show their change from clean in points: ``58.1 (-2.2)``."""
    clean = results["clean"]
    keys = [k for k in clean if k not in ("num_samples", "skipped")]
    table = Table(title=f"{title} ({fmt(clean.get('num_samples', 0.0))} clips)", title_justify="left")
    table.add_column("condition", style="bold cyan", no_wrap=True)
    for key in keys:
        table.add_column(key.replace("/", "/\n"), justify="right", overflow="fold")  # narrow: wrap, never "…"
    for name, metrics in results.items():
        cells = [fmt(metrics[k]) if name == "clean" else f"{fmt(metrics[k])} ({metrics[k] - clean[k]:+.3g})"
                 for k in keys]
        table.add_row(name, *cells)
    return table


def run_eval(recipe: Any, checkpoint: str | None, overrides: Sequence[str] = (), split: str | None = None,
             device: str = "auto", progress: bool | None = None, console: Any = None) -> dict[str, float]:
    """``fusionkit eval``: metrics of a checkpoint on the recipe's ``data.<split>`` set(s)."""
    return _run(recipe, checkpoint, [], overrides, split, device, progress, console)["clean"]


def run_robustness(recipe: Any, checkpoint: str | None, corrupt: Sequence[str], overrides: Sequence[str] = (),
                   split: str | None = None, device: str = "auto", progress: bool | None = None,
                   console: Any = None) -> dict[str, dict[str, float]]:
    """``fusionkit eval --corrupt SPEC ...``: ``{"clean": metrics, spec: metrics, ...}`` (SPECs of
    :mod:`fusionkit.data.corrupt`, checked before anything is built)."""
    return _run(recipe, checkpoint, parse_all(corrupt), overrides, split, device, progress, console)


def _run(recipe: Any, checkpoint: str | None, corruptions: Sequence[Corruption], overrides: Sequence[str],
         split: str | None, device: str, progress: bool | None, console: Any) -> dict[str, dict[str, float]]:
    """The metrics of every condition (clean, then each corruption) as one progress bar and one table."""
    from fusionkit.engine.config import dataset_specs, eval_config, train_config
    from fusionkit.recipes import RecipeError, load_recipe

    cfg = load_recipe(recipe, list(overrides))
    tcfg, ecfg = train_config(cfg), eval_config(cfg)
    split = split or ecfg["split"]
    specs = dataset_specs(cfg, split)
    if not specs:
        raise RecipeError(f"recipe has no data.{split} section to evaluate on")
    d = distributed.init(tcfg["distributed"]["backend"], tcfg["distributed"]["timeout_s"])
    dev = pick_device(device if device != "auto" else tcfg["device"])
    loaders = eval_loaders(specs, int(ecfg["batch_size"]), int(ecfg["num_workers"]), int(tcfg["seed"]), split)
    if corruptions:
        share_decoding(loaders, split)
    model, _ = model_for(cfg, checkpoint, dev)
    for name, loader in loaders.items():
        check_modalities(loader.dataset, model, f"data.{split}" if name == split else f"data.{split}.{name}")
    total = sum(len(loader) for loader in loaders.values()) * (1 + len(corruptions))
    reporter = Reporter(total, f"eval {cfg.get('name') or ''}".strip(), enabled=d.is_main, live=progress,
                        console=console, fields=())  # batches, time, clips/s: no epoch, loss or lr here
    try:
        results = evaluate_conditions(model, loaders, corruptions, dev, ecfg["precision"] or tcfg["precision"],
                                      tcfg["action"], tuple(ecfg["ks"]),
                                      on_batch=lambda n: reporter.update(1, clips=n))
    finally:
        reporter.close()
    title = f"{checkpoint or '(no checkpoint)'} on data.{split}"
    if not corruptions:
        reporter.table(f"Evaluation: {title}", results["clean"])
    elif reporter.enabled:
        reporter.console.print(robustness_table(f"Robustness: {title}", results))
    return results

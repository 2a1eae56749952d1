"""The training loop: ``fusionkit train RECIPE [key=value ...]``.

One optimizer step = ``accum_steps`` micro-batches of ``batch_size`` clips per process. Per step:
mixup (video and audio together) → forward under autocast → :func:`fusionkit.heads.total_loss`
(per-head losses, label smoothing in the heads) → backward (DDP gradient sync on the last
micro-batch only) → one all-reduce of (loss, non-finite flag, SIGTERM flag) → gradient clipping →
AdamW step (layer-wise lr, weight-decay exclusions) → scheduler step.

Faults: a non-finite loss stops the run with an error naming the step (``nonfinite: stop``) or drops
that step's update (``nonfinite: skip``). SIGTERM finishes the current step, writes a checkpoint and
returns cleanly. Undecodable clips are dropped by the collate and counted.

Exact resume: the data order is a function of (seed, epoch) (:class:`~.distributed.ShardedSampler`),
checkpoints are written at step boundaries with optimizer, scheduler, scaler, mixup and RNG states,
and resuming restarts the epoch's sampler at the saved position and restores the RNG states after
the loader iterator is created: the loss sequence equals an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusionkit.engine import distributed
from fusionkit.engine.checkpoint import (CheckpointManager, model_meta, model_tensors, optimizer_from_flat,
                                         optimizer_to_flat, read_meta, read_tensors, rng_state, set_rng_state,
                                         state_path, load_weights)
from fusionkit.engine.config import dataset_specs, eval_config, train_config
from fusionkit.engine.evaluate import autocast, default_monitor, eval_loaders, evaluate_sets
from fusionkit.engine.loading import batch_size_of, build_dataset, make_loader, to_device
from fusionkit.engine.mixup import Mixup
from fusionkit.engine.optim import build_optimizer, peak_lr
from fusionkit.engine.progress import Reporter
from fusionkit.engine.schedule import WarmupCosine
from fusionkit.heads import total_loss


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite (``train.nonfinite: stop``); the message names the step."""


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns."""

    status: str                      # finished, max_steps, interrupted
    step: int
    epoch: int
    losses: list[float] = field(default_factory=list)   # per optimizer step of this call (NaN: skipped)
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    skipped_steps: int = 0
    skipped_items: int = 0
    output_dir: Path | None = None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", distributed.info().local_rank)
        return torch.device("cpu")
    return torch.device(name)


def default_output_dir(recipe: Mapping[str, Any]) -> Path:
    return Path("runs") / str(recipe.get("name") or "run")


class Trainer:
    """Trains the model of a loaded recipe (``fusionkit.load_recipe``) on its ``data`` section.

    Args:
        recipe: the loaded recipe (a dict with ``data`` and ``train`` sections).
        output_dir: run directory (checkpoints, ``metrics.jsonl``, ``metrics.csv``); default
            ``train.output_dir`` or ``runs/<name>``.
        resume: ``None`` (fresh run), ``"auto"`` (latest checkpoint of ``output_dir``, if any) or a
            checkpoint path (``step_….safetensors``).
        progress: live progress bar (default: when stdout is a terminal); ``False`` prints log lines.
        console: rich console for output.
    """

    def __init__(self, recipe: Mapping[str, Any], output_dir: str | Path | None = None, resume: str | Path | None = None,
                 progress: bool | None = None, console: Any = None) -> None:
        self.recipe = dict(recipe)
        self.cfg = train_config(self.recipe)
        self.eval_cfg = eval_config(self.recipe)
        self.dist = distributed.init(self.cfg["distributed"]["backend"], self.cfg["distributed"]["timeout_s"])
        self.device = pick_device(self.cfg["device"])
        self.output_dir = Path(output_dir or self.cfg["output_dir"] or default_output_dir(self.recipe))
        self.resume = resume
        self.progress, self.console = progress, console
        self._stop_signal = False

    # -- setup --------------------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        from fusionkit.recipes import build_from_config

        torch.manual_seed(int(self.cfg["seed"]))  # frozen experts without pretrained weights: same on every rank
        model = build_from_config(self.recipe)
        if self.cfg["label_smoothing"] is not None:
            for head in model.heads.values():
                head.label_smoothing = float(self.cfg["label_smoothing"])
        return model.to(self.device)

    def _resume_path(self, manager: CheckpointManager) -> Path | None:
        if self.resume is None:
            return None
        if str(self.resume) == "auto":
            return manager.latest()
        path = Path(self.resume)
        if path.is_dir():
            found = CheckpointManager(path).latest()
            if found is None:
                raise FileNotFoundError(f"--resume: no complete checkpoint in {path}")
            return found
        if not path.is_file() or not state_path(path).is_file():
            raise FileNotFoundError(f"--resume: {path} is not a training checkpoint (needs {state_path(path).name} "
                                    "beside it)")
        return path

    def _on_sigterm(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self._stop_signal = True

    # -- the loop -----------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        cfg, d = self.cfg, self.dist
        specs = dataset_specs(self.recipe, "train")
        if len(specs) != 1:
            raise ValueError("recipe key 'data.train' must give exactly one dataset spec {type: ..., ...}"
                             if not specs else f"data.train: one training set expected, got {list(specs)}")
        train_set = build_dataset(next(iter(specs.values())), "data.train")
        val_specs = dataset_specs(self.recipe, "val")
        bs, accum = int(cfg["batch_size"]), int(cfg["accum_steps"])
        sampler = distributed.ShardedSampler(len(train_set), shuffle=True, seed=int(cfg["seed"]))
        spe = sampler.full_length() // bs // accum  # optimizer steps per epoch
        if spe < 1:
            raise ValueError(f"data.train has {len(train_set)} items: too few for one step of batch_size {bs} x "
                             f"accum_steps {accum} x {d.world_size} process(es)")
        total_steps = spe * int(cfg["epochs"])
        warmup = int(cfg["warmup_steps"]) if cfg["warmup_steps"] is not None else round(float(cfg["warmup_epochs"]) * spe)

        model = self.build_model()
        self.model = model  # the trained model (unwrapped), for callers and tests
        heads = model.heads
        fsdp = bool(cfg["distributed"]["fsdp"]) and d.enabled
        if fsdp and self.resume is not None:
            raise ValueError("--resume with train.distributed.fsdp is not supported yet (the optimizer state is "
                             "sharded); resume with DDP or start from the weights")
        if fsdp:  # FSDP replaces the parameters by sharded ones: wrap first, then build the optimizer over them
            net = distributed.wrap(model, self.device, True, cfg["distributed"]["find_unused_parameters"])
        optimizer = build_optimizer(model, cfg, d.world_size)
        lr = peak_lr(cfg, d.world_size)
        scheduler = WarmupCosine(optimizer, lr, total_steps, warmup, cfg["min_lr"], cfg["warmup_lr"], cfg["schedule"])
        scaler = torch.amp.GradScaler(self.device.type, enabled=cfg["precision"] == "fp16")
        mixup = Mixup(cfg["mixup"], {h: head.num_classes for h, head in heads.items()}, cfg["mixup_prob"],
                      seed=int(cfg["seed"]) + 7919 * d.rank,
                      multilabel=[h for h, head in heads.items() if getattr(head, "multilabel", False)])
        ck = cfg["checkpoint"]
        manager = CheckpointManager(self.output_dir, ck["keep_last"], ck["mode"])

        step, best, saved_rng = 0, None, None
        history: list[dict[str, Any]] = []
        resume_from = self._resume_path(manager)
        if resume_from is not None:
            meta = load_weights(model, resume_from)
            state_tensors = read_tensors(state_path(resume_from))
            state = read_meta(state_path(resume_from))["state"]
            optimizer_from_flat(optimizer, state_tensors, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            mixup.load_state_dict(state["mixup"][d.rank] if d.rank < len(state["mixup"]) else state["mixup"][0])
            step = int(state["step"])
            best = state.get("best")
            manager.best = best
            saved_rng = ({k.split("/", 1)[1]: v for k, v in state_tensors.items()
                          if k.startswith(f"rank{d.rank}/")}, state["rng"][d.rank] if d.rank < len(state["rng"]) else {})
            if not saved_rng[0]:
                saved_rng = None
            del meta
        torch.manual_seed(int(cfg["seed"]) + d.rank)

        if not fsdp:
            net = distributed.wrap(model, self.device, False, cfg["distributed"]["find_unused_parameters"])
        trainable = [p for p in model.parameters() if p.requires_grad]
        max_steps = cfg["max_steps"]
        val_loaders = eval_loaders(val_specs, int(self.eval_cfg["batch_size"]), int(self.eval_cfg["num_workers"]),
                                   int(cfg["seed"])) if val_specs and cfg["eval_every"] else {}
        eval_precision = self.eval_cfg["precision"] or cfg["precision"]
        action = cfg["action"]
        loader = make_loader(train_set, bs, sampler, int(cfg["num_workers"]), int(cfg["seed"]), drop_last=True)

        reporter = Reporter(total_steps, f"train {self.recipe.get('name') or ''}".strip(), enabled=d.is_main,
                            live=self.progress, console=self.console, completed=step)
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        result = TrainResult("finished", step, step // spe, output_dir=self.output_dir)
        losses: list[float] = []
        metrics: dict[str, float] = {}
        skipped_items = skipped_steps = 0
        t0 = time.perf_counter()

        def save(current_step: int, epoch_metrics: Mapping[str, float] | None = None) -> Path | None:
            weights = model_tensors(model, ck["trainable_only"], distributed.full_state_dict(net))
            # FSDP: each rank holds a shard of the optimizer state; only DDP / single-process runs save it
            opt_tensors, opt_meta = optimizer_to_flat(optimizer) if not fsdp else ({}, {"param_groups": [], "scalars": {}})
            rngs = distributed.gather_objects(rng_state())
            mixups = distributed.gather_objects(mixup.state_dict())
            if not d.is_main:
                distributed.barrier()
                return None
            tensors = dict(opt_tensors)
            for r, (rt, _) in enumerate(rngs):
                tensors.update({f"rank{r}/{k}": v for k, v in rt.items()})
            state = {"step": current_step, "epoch": current_step // spe, "steps_per_epoch": spe,
                     "world_size": d.world_size, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None, "mixup": mixups,
                     "rng": [rm for _, rm in rngs], "best": manager.best}
            meta = model_meta(model, self.recipe, int(cfg["seed"]), ck["trainable_only"], step=current_step,
                              epoch=current_step // spe, metrics=dict(epoch_metrics or {}))
            path = manager.save(current_step, weights, meta, tensors, state)
            distributed.barrier()
            return path

        try:
            start_epoch = step // spe
            for epoch in range(start_epoch, int(cfg["epochs"])):
                first = step - epoch * spe
                sampler.set_epoch(epoch, start=first * accum * bs)
                if isinstance(getattr(loader, "generator", None), torch.Generator):  # worker seeds: f(seed, epoch)
                    loader.generator.manual_seed(int(cfg["seed"]) * 100_003 + epoch)
                batches = iter(loader)
                if saved_rng is not None:  # after the iterator drew its base seed, as in the uninterrupted run
                    set_rng_state(*saved_rng)
                    saved_rng = None
                net.train()
                stop_reason = None
                for _ in range(first, spe):
                    if max_steps is not None and step >= int(max_steps):
                        stop_reason = "max_steps"
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss_sum, items = 0.0, 0
                    for micro in range(accum):
                        batch = next(batches)
                        skipped = batch.get("skipped") or []
                        if skipped and d.is_main:
                            for path, reason in skipped[:3]:
                                reporter.log(f"[yellow]skipped {path}: {reason}")
                        skipped_items += len(skipped)
                        inputs, targets = to_device(batch, self.device)
                        n = batch_size_of(batch)
                        items += n
                        sync = micro == accum - 1 or not hasattr(net, "no_sync")
                        ctx = net.no_sync() if not sync else contextlib.nullcontext()
                        with ctx:
                            if n == 0:  # every clip undecodable: a zero loss keeps the ranks in step
                                loss = sum(p.sum() * 0.0 for p in trainable)
                            else:
                                inputs, soft, _ = mixup(inputs, targets)
                                with autocast(self.device, cfg["precision"]):
                                    logits = net(inputs)
                                loss, _ = total_loss(heads, {k: v.float() for k, v in logits.items()}, soft,
                                                     cfg["loss_weights"] or None)
                            scaler.scale(loss / accum).backward()
                        loss_sum += float(loss.detach())
                    bad = not math.isfinite(loss_sum)
                    total, n_bad, n_stop, n_items = distributed.all_reduce_sum(
                        [0.0 if bad else loss_sum, float(bad), float(self._stop_signal), float(items)])
                    step_loss = total / accum / max(d.world_size - n_bad, 1) if n_bad < d.world_size else math.nan
                    if n_bad:
                        if cfg["nonfinite"] == "stop":
                            raise NonFiniteLossError(
                                f"non-finite loss ({loss_sum}) at step {step + 1} (epoch {epoch + 1}); set "
                                "train.nonfinite=skip to drop such steps, or lower the lr / use fp32")
                        optimizer.zero_grad(set_to_none=True)
                        skipped_steps += 1
                        step_loss = math.nan
                        reporter.log(f"[yellow]step {step + 1}: non-finite loss, update skipped")
                    else:
                        if cfg["clip_grad"] is not None:
                            scaler.unscale_(optimizer)
                            if hasattr(net, "clip_grad_norm_"):
                                net.clip_grad_norm_(float(cfg["clip_grad"]))
                            else:
                                torch.nn.utils.clip_grad_norm_(trainable, float(cfg["clip_grad"]))
                        scaler.step(optimizer)
                        scaler.update()
                    current_lr = scheduler.lr_at(step)
                    scheduler.step()
                    step += 1
                    losses.append(step_loss)
                    reporter.update(1, clips=int(n_items), epoch=f"{epoch + 1}/{cfg['epochs']}", loss=step_loss,
                                    lr=current_lr)
                    if not reporter.live and (step % int(cfg["log_every"]) == 0 or step == 1):
                        reporter.log(f"step {step}/{total_steps} epoch {epoch + 1}/{cfg['epochs']} loss {step_loss:.4f} "
                                     f"lr {current_lr:.3g} {reporter.speed():.1f} clips/s")
                    if n_stop:
                        stop_reason = "interrupted"
                        break
                    if ck["every_steps"] and step % int(ck["every_steps"]) == 0 and step % spe:
                        result.checkpoint = save(step) or result.checkpoint
                if stop_reason is not None:
                    result.status = stop_reason
                    result.checkpoint = save(step) or result.checkpoint
                    if stop_reason == "interrupted":
                        reporter.log(f"SIGTERM: checkpoint written at step {step}; resume with --resume")
                    break
                # end of epoch: validate, log, checkpoint
                metrics = {}
                done = epoch + 1
                if val_loaders and (done % int(cfg["eval_every"]) == 0 or done == int(cfg["epochs"])):
                    metrics = evaluate_sets(net if cfg["distributed"]["fsdp"] else model, val_loaders, self.device,
                                            eval_precision, action, tuple(self.eval_cfg["ks"]))
                finite = [x for x in losses[-spe:] if x == x]
                row = {"epoch": done, "step": step, "train/loss": sum(finite) / len(finite) if finite else math.nan,
                       "lr": scheduler.lr_at(max(step - 1, 0)), **{f"val/{k}": v for k, v in metrics.items()}}
                history.append(row)
                if d.is_main:
                    self._write_metrics(row)
                    reporter.log("epoch {}: ".format(done) + ", ".join(
                        f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "step") and isinstance(v, float)))
                monitor = ck["monitor"] or default_monitor(metrics)
                if ck["keep_best"] and monitor and monitor in metrics and manager.is_better(metrics[monitor]):
                    weights = model_tensors(model, ck["trainable_only"], distributed.full_state_dict(net))
                    if d.is_main:
                        manager.save_best(metrics[monitor], weights, model_meta(
                            model, self.recipe, int(cfg["seed"]), ck["trainable_only"], step=step, epoch=done,
                            metrics=metrics, monitor=monitor))
                    else:
                        manager.best = metrics[monitor]
                if (ck["every_epochs"] and done % int(ck["every_epochs"]) == 0) or done == int(cfg["epochs"]):
                    result.checkpoint = save(step, metrics) or result.checkpoint
        finally:
            reporter.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        result.step, result.epoch, result.losses, result.metrics = step, step // spe, losses, metrics
        result.skipped_steps, result.skipped_items = skipped_steps, skipped_items
        elapsed = time.perf_counter() - t0
        if d.is_main:
            rows = {"status": result.status, "steps": f"{step}/{total_steps}", "epochs": f"{step / spe:.2f}",
                    "time (s)": elapsed, "clips/s": reporter.speed(),
                    "last loss": next((x for x in reversed(losses) if x == x), math.nan),
                    "peak lr": lr, "skipped steps": skipped_steps, "skipped clips": skipped_items,
                    **{k: v for k, v in metrics.items()}, "best": manager.best if manager.best is not None else "-",
                    "checkpoint": str(result.checkpoint) if result.checkpoint else "-"}
            reporter.table(f"Training summary ({self.output_dir})", rows)
        return result

    def _write_metrics(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` to ``metrics.jsonl`` and rewrite ``metrics.csv`` (columns: union of all rows)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        jsonl = self.output_dir / "metrics.jsonl"
        with open(jsonl, "a") as f:
            f.write(json.dumps(dict(row)) + "\n")
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        columns: list[str] = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
        with open(self.output_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


def train(recipe: Any, overrides: Iterable[str] = (), output_dir: str | Path | None = None,
          resume: str | Path | None = None, progress: bool | None = None, console: Any = None) -> TrainResult:
    """Load ``recipe`` (path, name or mapping) with dotlist ``overrides`` and train it."""
    from fusionkit.recipes import load_recipe

    return Trainer(load_recipe(recipe, list(overrides)), output_dir, resume, progress, console).fit()

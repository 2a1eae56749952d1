"""The training loop: ``fusionkit train RECIPE [key=value ...]``.

One optimizer step = ``accum_steps`` micro-batches of ``batch_size`` clips per process. Per step:
mixup (video and audio together) → forward under autocast → :func:`fusionkit.heads.total_loss`
(per-head losses, label smoothing in the heads) → backward (DDP gradient sync on the last
micro-batch only) → one all-reduce of (loss, non-finite flag, SIGTERM flag) → gradient clipping →
AdamW step (layer-wise lr, weight-decay exclusions) → scheduler step.

Faults: a non-finite loss stops the run with an error naming the step (``nonfinite: stop``) or drops
that step's update (``nonfinite: skip``; more than ``max_nonfinite_fraction`` of an epoch's steps
stops the run). SIGTERM finishes the current step, writes a checkpoint and returns cleanly; Ctrl-C
does the same and then raises ``KeyboardInterrupt`` with a one-line message (a second Ctrl-C stops at
once). Undecodable clips are dropped by the collate and counted; an epoch whose clips are all
undecodable (or more than ``max_skipped_fraction`` of them) is an error.

Before the first step: the run directory is claimed (:func:`~.checkpoint.claim_run_dir`: writable,
locked, not holding another run unless resuming), every head's label and every expert's modality are
checked against the training set, and (distributed) one probe backward finds the trainable parameters
that get no gradient (:mod:`~.unused`), the reason DDP gets ``find_unused_parameters``
(``train.distributed.find_unused_parameters: auto``, only when needed); in one process the first step
tells. Either way they are named in one warning after the first step. Resuming rewrites
``metrics.jsonl`` without the rows after the resumed step and
restores the epoch's partial tally (its step losses, skipped clips and steps).

The run folder (rank 0): ``recipe.yaml`` (the resolved recipe, :mod:`~.run_folder`), ``train.log``
(the log lines, appended), ``metrics.jsonl`` (a step row every ``log_every`` steps: loss, lr, clips/s,
gradient norm before clipping; an epoch row after each epoch, :mod:`~.metrics_file`) and
``metrics.csv``, ``tb/`` (TensorBoard events, with the ``tensorboard`` extra, :mod:`~.tensorboard_log`),
``curves.png`` at the end (:mod:`~.plots`), checkpoints.

Exact resume: the data order is a function of (seed, epoch) (:class:`~.distributed.ShardedSampler`),
checkpoints are written at step boundaries with optimizer, scheduler, scaler, mixup and RNG states,
and resuming restarts the epoch's sampler at the saved position and restores the RNG states after
the loader iterator is created: the loss sequence equals an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusionkit.engine import distributed, unused
from fusionkit.engine.checkpoint import (CheckpointError, CheckpointManager, RunDirError, atomic_write_bytes,
                                         claim_run_dir, frozen_fingerprint, load_weights, model_meta, model_tensors,
                                         new_run_id, optimizer_from_flat, optimizer_to_flat, read_meta, read_tensors,
                                         rng_state, set_rng_state, state_path)
from fusionkit.engine.config import check_frozen_precision, dataset_specs, eval_config, train_config
from fusionkit.engine.device import autocast, cast_frozen, pick_device
from fusionkit.engine.evaluate import default_monitor, eval_loaders, evaluate_sets
from fusionkit.engine.loading import (batch_size_of, build_dataset, check_labels, check_modalities, make_loader,
                                      to_device)
from fusionkit.engine.metrics_file import MetricsFile, read_rows
from fusionkit.engine.mixup import Mixup
from fusionkit.engine.optim import build_optimizer, peak_lr
from fusionkit.engine.progress import Reporter
from fusionkit.engine.run_folder import LOG_FILE, LogFile, write_recipe
from fusionkit.engine.schedule import WarmupCosine
from fusionkit.engine.tensorboard_log import TensorBoardLog, open_writer
from fusionkit.errors import DataError, FusionkitError, describe_os_error, one_line
from fusionkit.heads import total_loss
from fusionkit.recipes import RecipeError


class NonFiniteLossError(FusionkitError, FloatingPointError):
    """The loss became NaN or infinite (``train.nonfinite: stop``), or too many steps were skipped for it
    (``train.nonfinite: skip``); the message names the step."""


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


@dataclass
class EpochTally:
    """The current epoch so far, over all ranks; saved in checkpoints, so that a resumed epoch reports
    (and limits) all of its steps, not only the resumed ones."""

    losses: list[float] = field(default_factory=list)   # per optimizer step (NaN: update skipped)
    clips: int = 0                                      # clips the loader gave
    skipped: int = 0                                    # of which undecodable
    nonfinite: int = 0                                  # updates dropped for a non-finite loss

    def mean_loss(self) -> float:
        finite = [x for x in self.losses if x == x]
        return sum(finite) / len(finite) if finite else math.nan

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        return ({"tally.losses": torch.tensor(self.losses, dtype=torch.float64)},
                {"clips": self.clips, "skipped": self.skipped, "nonfinite": self.nonfinite})

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, int] | None) -> EpochTally:
        if meta is None:  # a checkpoint of an older version: the resumed steps only
            return cls()
        losses = tensors.get("tally.losses")
        return cls([float(x) for x in losses.tolist()] if losses is not None else [], int(meta["clips"]),
                   int(meta["skipped"]), int(meta["nonfinite"]))


def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """The total L2 norm of the gradients of ``params`` (those that have one), a 0-d tensor; of sharded
    (FSDP, ``DTensor``) gradients the norm of the whole."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return _full(torch.nn.utils.get_total_norm(grads, 2.0))


def _full(norm: torch.Tensor) -> torch.Tensor:
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def default_output_dir(recipe: Mapping[str, Any]) -> Path:
    return Path("runs") / str(recipe.get("name") or "run")


def _inside(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


class Trainer:
    """Trains the model of a loaded recipe (``fusionkit.load_recipe``) on its ``data`` section.

    Args:
        recipe: the loaded recipe (a dict with ``data`` and ``train`` sections).
        output_dir: run directory (``recipe.yaml``, ``train.log``, ``metrics.jsonl``, ``metrics.csv``, ``tb/``,
            ``curves.png``, checkpoints); default
            ``train.output_dir`` or ``runs/<name>``. It belongs to this run while it trains
            (``run.lock``); a fresh run refuses a directory that holds another run's files.
        resume: ``None`` (fresh run: the directory must hold no run), ``"auto"`` (the latest checkpoint
            of ``output_dir``; a fresh start when it holds none) or a checkpoint path (``step_….safetensors``,
            or a run directory for its latest).
        progress: live progress bar (default: when stdout is a terminal); ``False`` prints log lines.
        console: rich console for output.
    """

    def __init__(self, recipe: Mapping[str, Any], output_dir: str | Path | None = None, resume: str | Path | None = None,
                 progress: bool | None = None, console: Any = None) -> None:
        from fusionkit.recipes import check_config

        self.recipe = dict(recipe)
        check_config(self.recipe)  # a typo in the model's sections fails before the data are looked at
        self.cfg = train_config(self.recipe)
        self.eval_cfg = eval_config(self.recipe)
        check_frozen_precision(self.cfg, self.eval_cfg)
        self.dist = distributed.init(self.cfg["distributed"]["backend"], self.cfg["distributed"]["timeout_s"])
        self.device = pick_device(self.cfg["device"])
        self.output_dir = Path(output_dir or self.cfg["output_dir"] or default_output_dir(self.recipe))
        self.resume = resume
        self.progress, self.console = progress, console
        self._stop_signal = False   # SIGTERM: checkpoint after this step, return
        self._interrupt = False     # Ctrl-C: checkpoint after this step, raise KeyboardInterrupt
        self._phase = "setup"       # setup, step (before the update: the step-start snapshot is valid), update, other
        self._snapshot: Any = None
        self.lock: Any = None
        self.metrics_file = MetricsFile(self.output_dir)
        self.log_file: LogFile | None = None          # train.log (rank 0)
        self.tensorboard: TensorBoardLog | None = None
        self._tensorboard_tried = False

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
                raise CheckpointError(f"--resume: no complete checkpoint in {path}")
            return found
        if not path.is_file() or not state_path(path).is_file():
            raise CheckpointError(f"--resume: {path} is not a training checkpoint (needs {state_path(path).name} "
                                  "beside it)")
        return path

    def _on_sigterm(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self._stop_signal = True

    def _on_sigint(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self._interrupt = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    def _setup_data(self) -> None:
        cfg, d = self.cfg, self.dist
        specs = dataset_specs(self.recipe, "train")
        if len(specs) != 1:
            raise RecipeError("recipe key 'data.train' must give exactly one dataset spec {type: ..., ...}"
                              if not specs else f"data.train: one training set expected, got {list(specs)}")
        self.train_set = build_dataset(next(iter(specs.values())), "data.train")
        self.val_specs = dataset_specs(self.recipe, "val")
        self.bs, self.accum = int(cfg["batch_size"]), int(cfg["accum_steps"])
        self.sampler = distributed.ShardedSampler(len(self.train_set), shuffle=True, seed=int(cfg["seed"]))
        self.spe = self.sampler.full_length() // self.bs // self.accum  # optimizer steps per epoch
        if self.spe < 1:
            raise RecipeError(f"data.train has {len(self.train_set)} items: too few for one step of batch_size "
                              f"{self.bs} x accum_steps {self.accum} x {d.world_size} process(es)")
        self.total_steps = self.spe * int(cfg["epochs"])
        self.warmup = int(cfg["warmup_steps"]) if cfg["warmup_steps"] is not None \
            else round(float(cfg["warmup_epochs"]) * self.spe)
        for key in ("max_nonfinite_fraction", "max_skipped_fraction"):
            value = cfg[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise RecipeError(f"recipe key 'train.{key}' must be a fraction in [0, 1], got {value!r}")
        if bool(cfg["distributed"]["fsdp"]) and d.enabled and self.resume is not None:
            raise RecipeError("--resume with train.distributed.fsdp is not supported yet (the optimizer state is "
                              "sharded); resume with DDP or start from the weights")

    def _claim_output_dir(self) -> None:
        """Rank 0 claims the run directory (lock, leftovers, no foreign run); every rank fails alike."""
        resume = self.resume
        outside = resume is not None and str(resume) != "auto" and not _inside(Path(resume), self.output_dir)
        error = None
        if self.dist.is_main:
            try:
                self.lock = claim_run_dir(self.output_dir, new_run=resume is None or outside)
            except RunDirError as err:
                error = err
        message = distributed.gather_objects(str(error) if error else None)[0]
        if error is not None:
            raise error
        if message:
            raise RunDirError(message)

    def _setup_model(self) -> None:
        cfg, d = self.cfg, self.dist
        model = self.build_model()
        self.model = model  # the trained model (unwrapped), for callers and tests
        self.fingerprint = frozen_fingerprint(model)  # as built (before train.frozen_precision casts them)
        model.recompute = cfg["recompute_experts"]
        self.heads = model.heads
        check_labels(self.train_set, self.heads, "data.train")
        check_modalities(self.train_set, model, "data.train")
        # distributed: one probe backward before DDP is built (it must know); one process: the first step tells
        self.grad_probe = unused.probe(model, self.device) if d.enabled else unused.GradientProbe()
        self._grads_reported = False
        self.fsdp = bool(cfg["distributed"]["fsdp"]) and d.enabled
        if self.fsdp:  # FSDP replaces the parameters by sharded ones: wrap first, then build the optimizer over them
            self.net = distributed.wrap(model, self.device, True)
        try:
            self.optimizer = build_optimizer(model, cfg, d.world_size)
        except ValueError as err:
            raise RecipeError(str(err)) from err
        self.lr = peak_lr(cfg, d.world_size)
        self.scheduler = WarmupCosine(self.optimizer, self.lr, self.total_steps, self.warmup, cfg["min_lr"],
                                      cfg["warmup_lr"], cfg["schedule"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg["precision"] == "fp16")
        heads = self.heads
        self.mixup = Mixup(cfg["mixup"], {h: head.num_classes for h, head in heads.items()}, cfg["mixup_prob"],
                           seed=int(cfg["seed"]) + 7919 * d.rank,
                           multilabel=[h for h, head in heads.items() if getattr(head, "multilabel", False)])
        ck = cfg["checkpoint"]
        self.manager = CheckpointManager(self.output_dir, ck["keep_last"], ck["mode"])

    def _restore(self) -> None:
        """Load the checkpoint to resume from (if any), then align the run directory with its step."""
        d = self.dist
        self.step, self.saved_rng, self.tally = 0, None, EpochTally()
        self.run_id = new_run_id()
        resume_from = self._resume_path(self.manager)
        if resume_from is not None:
            load_weights(self.model, resume_from)
            state_tensors = read_tensors(state_path(resume_from))
            state = read_meta(state_path(resume_from))["state"]
            optimizer_from_flat(self.optimizer, state_tensors, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.mixup.load_state_dict(state["mixup"][d.rank] if d.rank < len(state["mixup"]) else state["mixup"][0])
            self.step = int(state["step"])
            self.manager.best = state.get("best")
            self.run_id = state.get("run_id")  # None: written before run ids; every step checkpoint counts
            if self.step % self.spe:
                self.tally = EpochTally.from_state(state_tensors, state.get("tally"))
            saved = ({k.split("/", 1)[1]: v for k, v in state_tensors.items() if k.startswith(f"rank{d.rank}/")},
                     state["rng"][d.rank] if d.rank < len(state["rng"]) else {})
            self.saved_rng = saved if saved[0] else None
        self.manager.run_id = self.run_id
        self.resumed_step = self.step if resume_from is not None else None
        if d.is_main and self.resume is not None:
            if resume_from is not None and _inside(resume_from, self.output_dir):
                moved = self.manager.supersede(self.step)
                if moved:
                    self._early_log(f"resuming from step {self.step}: {len(moved)} later checkpoint(s) of an "
                                    f"abandoned continuation moved to {moved[0].parent}")
            self.metrics_file.truncate(self.step)
        if d.is_main:
            if resume_from is not None:
                self._record(f"resuming from step {self.step}: {resume_from}")
            changed = write_recipe(self.output_dir, self.recipe, self.step)
            if changed:
                self._early_log(changed)
        cast = cast_frozen(self.model, self.cfg["frozen_precision"] or "fp32")  # after loading: checks the fp32 build
        if cast and d.is_main:
            self._early_log(f"frozen weights: {cast} tensors of Linear / Conv layers kept in {self.cfg['frozen_precision']}")
        torch.manual_seed(int(self.cfg["seed"]) + d.rank)

    def _setup_loop(self) -> None:
        cfg = self.cfg
        self.find_unused = unused.find_unused(cfg["distributed"]["find_unused_parameters"], self.grad_probe) \
            if self.dist.enabled and not self.fsdp else None
        if not self.fsdp:
            self.net = distributed.wrap(self.model, self.device, False, bool(self.find_unused))
        if cfg["compile"]:  # the first step compiles (its time is logged); checkpoints come from the plain model
            self.net = torch.compile(self.net)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.val_loaders = eval_loaders(self.val_specs, int(self.eval_cfg["batch_size"]),
                                        int(self.eval_cfg["num_workers"]), int(cfg["seed"])) \
            if self.val_specs and cfg["eval_every"] else {}
        for name, loader in self.val_loaders.items():
            check_modalities(loader.dataset, self.model, "data.val" if name == "val" else f"data.val.{name}")
        self.loader = make_loader(self.train_set, self.bs, self.sampler, int(cfg["num_workers"]), int(cfg["seed"]),
                                  drop_last=True)
        self.reporter = Reporter(self.total_steps, f"train {self.recipe.get('name') or ''}".strip(),
                                 enabled=self.dist.is_main, live=self.progress, console=self.console,
                                 completed=self.step, log_file=self.log_file)
        self._window = [0, 0.0]  # clips and step seconds since the last step row (its clips_per_s)
        self.result = TrainResult("finished", self.step, self.step // self.spe, output_dir=self.output_dir)
        self.losses: list[float] = []
        self.metrics: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.skipped_items = self.skipped_steps = 0
        self._skip_example: tuple[str, str] | None = None
        self._ctrl_c: str | None = None

    # -- the loop -----------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        self._setup_data()
        self._claim_output_dir()
        try:
            self._open_log()
            self._setup_model()
            self._restore()
            self._setup_loop()
            t0 = time.perf_counter()
            self._train()
            self._summary(time.perf_counter() - t0)
            if self._ctrl_c:
                self._record(f"error: {self._ctrl_c}")
            elif self.dist.is_main:
                self._write_curves()
        except BaseException as err:
            self._record(f"error: {_error_line(err)}")
            raise
        finally:
            self._close_run_files()
            if self.lock is not None:
                self.lock.release()
        if self._ctrl_c:
            raise KeyboardInterrupt(self._ctrl_c)
        return self.result

    def _train(self) -> None:
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_sigterm),
                        signal.SIGINT: signal.signal(signal.SIGINT, self._on_sigint)}
        try:
            for epoch in range(self.step // self.spe, int(self.cfg["epochs"])):
                if self._run_epoch(epoch):
                    break
        except KeyboardInterrupt:  # not between steps (the handler's flag), e.g. a second Ctrl-C
            self._raw_interrupt()
        finally:
            self.reporter.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._phase = "other"

    def _epoch_batches(self, epoch: int, first: int) -> Iterator[Any]:
        cfg = self.cfg
        self.sampler.set_epoch(epoch, start=first * self.accum * self.bs)
        if isinstance(getattr(self.loader, "generator", None), torch.Generator):  # worker seeds: f(seed, epoch)
            self.loader.generator.manual_seed(int(cfg["seed"]) * 100_003 + epoch)
        batches = iter(self.loader)
        if self.saved_rng is not None:  # after the iterator drew its base seed, as in the uninterrupted run
            set_rng_state(*self.saved_rng)
            self.saved_rng = None
        return batches

    def _run_epoch(self, epoch: int) -> bool:
        """One epoch (or its rest, resuming); True when the run stops before its end."""
        cfg, ck = self.cfg, self.cfg["checkpoint"]
        first = self.step - epoch * self.spe
        if first == 0:
            self.tally = EpochTally()
        batches = self._epoch_batches(epoch, first)
        self.net.train()
        stop_reason = None
        for _ in range(first, self.spe):
            if cfg["max_steps"] is not None and self.step >= int(cfg["max_steps"]):
                stop_reason = "max_steps"
                break
            stop_reason = self._step(epoch, batches)
            if stop_reason is not None:
                break
            if ck["every_steps"] and self.step % int(ck["every_steps"]) == 0 and self.step % self.spe:
                self.result.checkpoint = self._save(self.step) or self.result.checkpoint
        if stop_reason is None:
            self._end_epoch(epoch)
            return False
        if stop_reason == "max_steps":
            self._check_skipped(epoch, end=True)
        self.result.status = "interrupted" if stop_reason == "ctrl-c" else stop_reason
        self.result.checkpoint = self._save(self.step) or self.result.checkpoint
        if stop_reason == "interrupted":
            self.reporter.log(f"SIGTERM: checkpoint written at step {self.step}; resume with --resume")
        elif stop_reason == "ctrl-c":
            self._ctrl_c = (f"interrupted (Ctrl-C) at step {self.step}: checkpoint {self.result.checkpoint} written; "
                            "continue with --resume")
        return True

    def _step(self, epoch: int, batches: Iterator[Any]) -> str | None:
        """One optimizer step; returns a stop reason (``interrupted``: SIGTERM, ``ctrl-c``) or None."""
        cfg, d = self.cfg, self.dist
        started = time.perf_counter()
        self._snapshot = None if d.enabled else (rng_state(), self.mixup.state_dict())  # for a mid-step Ctrl-C
        self._phase = "step"
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, items, skipped = self._micro_batches(batches)
        if not self._grads_reported:  # once, after the first backward of this process (before DDP fails on it)
            self._grads_reported = True
            warning = unused.report(self.grad_probe, unused.missing_grads(self.model), self.find_unused)
            if warning and d.is_main:
                self.reporter.log(f"[yellow]{warning}")
        bad = not math.isfinite(loss_sum)
        total, n_bad, n_term, n_int, n_items, n_skipped = distributed.all_reduce_sum(
            [0.0 if bad else loss_sum, float(bad), float(self._stop_signal), float(self._interrupt), float(items),
             float(skipped)])
        step_loss = total / self.accum / max(d.world_size - n_bad, 1) if n_bad < d.world_size else math.nan
        self._phase = "update"
        norm = None
        if n_bad:
            step_loss = self._skip_update(loss_sum, epoch)
        else:
            norm = self._update(measure=(self.step + 1) % int(cfg["log_every"]) == 0)
        current_lr = self.scheduler.lr_at(self.step)
        self.scheduler.step()
        self.step += 1
        self._phase = "other"
        self.losses.append(step_loss)
        tally = self.tally
        tally.losses.append(step_loss)
        tally.clips += int(n_items + n_skipped)
        tally.skipped += int(n_skipped)
        seconds = time.perf_counter() - started
        self._log_step(epoch, step_loss, current_lr, int(n_items), norm, seconds)
        if cfg["compile"] and self.step == (self.resumed_step or 0) + 1 and d.is_main:
            self.reporter.log(f"torch.compile: first step {seconds:.1f} s (compilation included)")
        if n_bad and tally.nonfinite > float(cfg["max_nonfinite_fraction"]) * self.spe:
            raise NonFiniteLossError(
                f"{tally.nonfinite} of the {self.spe} steps of epoch {epoch + 1} had a non-finite loss and were "
                f"skipped (more than train.max_nonfinite_fraction={cfg['max_nonfinite_fraction']}), the last at "
                f"step {self.step}; lower the lr or use fp32")
        self._check_skipped(epoch)
        return "interrupted" if n_term else "ctrl-c" if n_int else None

    def _micro_batches(self, batches: Iterator[Any]) -> tuple[float, int, int]:
        """Forward and backward of ``accum_steps`` micro-batches; (summed loss, clips, skipped clips)."""
        cfg, d = self.cfg, self.dist
        net, accum = self.net, self.accum
        loss_sum, items, skipped_here = 0.0, 0, 0
        for micro in range(accum):
            batch = next(batches)
            skipped = batch.get("skipped") or []
            if skipped:
                self._skip_example = tuple(skipped[0])
                if d.is_main:
                    for path, reason in skipped[:3]:
                        self.reporter.log(f"[yellow]skipped {path}: {reason}")
            self.skipped_items += len(skipped)
            skipped_here += len(skipped)
            inputs, targets = to_device(batch, self.device)
            n = batch_size_of(batch)
            items += n
            sync = micro == accum - 1 or not hasattr(net, "no_sync")
            ctx = net.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                if n == 0:  # every clip undecodable: a zero loss keeps the ranks in step
                    loss = sum(p.sum() * 0.0 for p in self.trainable)
                else:
                    inputs, soft, _ = self.mixup(inputs, targets)
                    with autocast(self.device, cfg["precision"]):
                        logits = net(inputs)
                    loss, _ = total_loss(self.heads, {k: v.float() for k, v in logits.items()}, soft,
                                         cfg["loss_weights"] or None)
                self.scaler.scale(loss / accum).backward()
            loss_sum += float(loss.detach())
        return loss_sum, items, skipped_here

    def _skip_update(self, loss_sum: float, epoch: int) -> float:
        """A non-finite loss on some rank: stop (``nonfinite: stop``) or drop this step's update."""
        if self.cfg["nonfinite"] == "stop":
            raise NonFiniteLossError(
                f"non-finite loss ({loss_sum}) at step {self.step + 1} (epoch {epoch + 1}); set "
                "train.nonfinite=skip to drop such steps, or lower the lr / use fp32")
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.tally.nonfinite += 1
        self.reporter.log(f"[yellow]step {self.step + 1}: non-finite loss, update skipped")
        return math.nan

    def _update(self, measure: bool = False) -> float | None:
        """Clip (``clip_grad``) and step; returns the total gradient norm before clipping when ``measure``
        (a logged step; clipping computes it anyway), else None."""
        cfg, net, optimizer, scaler = self.cfg, self.net, self.optimizer, self.scaler
        norm = None
        if cfg["clip_grad"] is not None:
            scaler.unscale_(optimizer)
            if hasattr(net, "clip_grad_norm_"):
                norm = net.clip_grad_norm_(float(cfg["clip_grad"]))
            else:
                norm = torch.nn.utils.clip_grad_norm_(self.trainable, float(cfg["clip_grad"]))
        elif measure:
            scaler.unscale_(optimizer)  # the true gradients under fp16 (a no-op otherwise); step() knows it
            norm = grad_norm(self.trainable)
        scaler.step(optimizer)
        scaler.update()
        return float(_full(norm)) if measure and norm is not None else None

    def _log_step(self, epoch: int, step_loss: float, current_lr: float, clips: int, norm: float | None,
                  seconds: float) -> None:
        """The bar, a log line at step 1 and every ``log_every`` steps, and a step row every ``log_every`` steps."""
        cfg, reporter, window = self.cfg, self.reporter, self._window
        reporter.update(1, clips=clips, epoch=f"{epoch + 1}/{cfg['epochs']}", loss=step_loss, lr=current_lr)
        window[0] += clips
        window[1] += seconds
        row_step = self.step % int(cfg["log_every"]) == 0
        if row_step or self.step == 1:
            line = (f"step {self.step}/{self.total_steps} epoch {epoch + 1}/{cfg['epochs']} loss {step_loss:.4f} "
                    f"lr {current_lr:.3g} {reporter.speed():.1f} clips/s"
                    + (f" grad norm {norm:.3g}" if norm is not None else ""))
            if reporter.live:  # the bar shows it; the log keeps it
                reporter.record(line)
            else:
                reporter.log(line)
        if row_step:
            row = {"kind": "step", "step": self.step, "epoch": self.step / self.spe, "train/loss": step_loss,
                   "lr": current_lr, "clips_per_s": window[0] / max(window[1], 1e-9),
                   "grad_norm": norm if norm is not None else math.nan}
            self._window = [0, 0.0]
            if self.dist.is_main:
                self._write_metrics(row)

    def _check_skipped(self, epoch: int, end: bool = False) -> None:
        """Too many undecodable clips in this epoch: more than ``max_skipped_fraction`` of its clips, or
        (at its end) every clip it gave."""
        tally, frac = self.tally, float(self.cfg["max_skipped_fraction"])
        per_epoch = self.spe * self.accum * self.bs * self.dist.world_size
        every = end and tally.clips > 0 and tally.skipped >= tally.clips
        if not every and tally.skipped <= frac * per_epoch:
            return
        example = f"; e.g. {self._skip_example[0]}: {self._skip_example[1]}" if self._skip_example else ""
        what = (f"every one of the {tally.clips} clips" if every else
                f"{tally.skipped} of the {per_epoch} clips (more than train.max_skipped_fraction={frac})")
        raise DataError(f"data.train: {what} of epoch {epoch + 1} failed to decode{example}; check the files "
                        "and the manifest")

    def _raw_interrupt(self) -> None:
        """A KeyboardInterrupt inside a step: checkpoint the last finished step if nothing of the step's
        update has happened (the step-start snapshot of the RNG and mixup states is then exact)."""
        saved = None
        if self._phase == "step" and self._snapshot is not None:
            saved = self._save(self.step, snapshot=self._snapshot)
        if saved is not None:
            self._ctrl_c = f"interrupted (Ctrl-C) at step {self.step}: checkpoint {saved} written; continue with --resume"
        else:
            latest = self.manager.latest() if self.dist.is_main else None
            self._ctrl_c = (f"interrupted (Ctrl-C) during step {self.step + 1}: no checkpoint written; the last one "
                            f"is {latest or '(none)'}")
        self.result.status = "interrupted"
        self.result.checkpoint = saved or self.result.checkpoint

    def _end_epoch(self, epoch: int) -> None:
        """Validate, log the epoch's row, keep the best weights, checkpoint."""
        cfg, ck, d = self.cfg, self.cfg["checkpoint"], self.dist
        self._check_skipped(epoch, end=True)
        metrics: dict[str, float] = {}
        done = epoch + 1
        if self.val_loaders and (done % int(cfg["eval_every"]) == 0 or done == int(cfg["epochs"])):
            bar = self.reporter.sub_bar(f"val epoch {done}",
                                        sum(len(loader) for loader in self.val_loaders.values()))
            try:
                metrics = evaluate_sets(self.net if cfg["distributed"]["fsdp"] else self.model, self.val_loaders,
                                        self.device, self.eval_cfg["precision"] or cfg["precision"], cfg["action"],
                                        tuple(self.eval_cfg["ks"]), on_batch=bar.update)
            finally:
                bar.close()
        row = {"kind": "epoch", "epoch": done, "step": self.step, "train/loss": self.tally.mean_loss(),
               "lr": self.scheduler.lr_at(max(self.step - 1, 0)), **{f"val/{k}": v for k, v in metrics.items()}}
        self.history.append(row)
        if d.is_main:
            self._write_metrics(row)
            self.reporter.log("epoch {}: ".format(done) + ", ".join(
                f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "step") and isinstance(v, float)))
        monitor = ck["monitor"] or default_monitor(metrics)
        if ck["keep_best"] and monitor and monitor in metrics and self.manager.is_better(metrics[monitor]):
            weights = model_tensors(self.model, ck["trainable_only"], distributed.full_state_dict(self.net))
            if d.is_main:
                self.manager.save_best(metrics[monitor], weights, model_meta(
                    self.model, self.recipe, int(cfg["seed"]), ck["trainable_only"], self.fingerprint,
                    step=self.step, epoch=done,
                    metrics=metrics, monitor=monitor))
            else:
                self.manager.best = metrics[monitor]
        if (ck["every_epochs"] and done % int(ck["every_epochs"]) == 0) or done == int(cfg["epochs"]):
            self.result.checkpoint = self._save(self.step, metrics) or self.result.checkpoint
        self.metrics = metrics

    def _save(self, current_step: int, epoch_metrics: Mapping[str, float] | None = None,
              snapshot: Any = None) -> Path | None:
        """Checkpoint ``current_step`` (rank 0 writes; RNG / mixup states of every rank, or ``snapshot``)."""
        cfg, ck, d, spe = self.cfg, self.cfg["checkpoint"], self.dist, self.spe
        weights = model_tensors(self.model, ck["trainable_only"], distributed.full_state_dict(self.net))
        # FSDP: each rank holds a shard of the optimizer state; only DDP / single-process runs save it
        opt_tensors, opt_meta = optimizer_to_flat(self.optimizer) if not self.fsdp \
            else ({}, {"param_groups": [], "scalars": {}})
        rngs = [snapshot[0]] if snapshot is not None else distributed.gather_objects(rng_state())
        mixups = [snapshot[1]] if snapshot is not None else distributed.gather_objects(self.mixup.state_dict())
        if not d.is_main:
            distributed.barrier()
            return None
        tensors = dict(opt_tensors)
        for r, (rt, _) in enumerate(rngs):
            tensors.update({f"rank{r}/{k}": v for k, v in rt.items()})
        tally_tensors, tally_meta = self.tally.state()
        tensors.update(tally_tensors)
        state = {"step": current_step, "epoch": current_step // spe, "steps_per_epoch": spe,
                 "world_size": d.world_size, "optimizer": opt_meta, "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, "mixup": mixups,
                 "rng": [rm for _, rm in rngs], "best": self.manager.best, "tally": tally_meta}
        meta = model_meta(self.model, self.recipe, int(cfg["seed"]), ck["trainable_only"], self.fingerprint,
                          step=current_step, epoch=current_step // spe, metrics=dict(epoch_metrics or {}))
        path = self.manager.save(current_step, weights, meta, tensors, state)
        distributed.barrier()
        return path

    def _summary(self, elapsed: float) -> None:
        result, step, spe, losses, manager = self.result, self.step, self.spe, self.losses, self.manager
        result.step, result.epoch, result.losses, result.metrics = step, step // spe, losses, self.metrics
        result.skipped_steps, result.skipped_items = self.skipped_steps, self.skipped_items
        if self.dist.is_main:
            rows = {"status": result.status, "steps": f"{step}/{self.total_steps}", "epochs": f"{step / spe:.2f}",
                    "time (s)": elapsed, "clips/s": self.reporter.speed(),
                    "last loss": next((x for x in reversed(losses) if x == x), math.nan),
                    "peak lr": self.lr, "skipped steps": self.skipped_steps, "skipped clips": self.skipped_items,
                    **{k: v for k, v in self.metrics.items()}, "best": manager.best if manager.best is not None else "-",
                    "checkpoint": str(result.checkpoint) if result.checkpoint else "-"}
            self.reporter.table(f"Training summary ({self.output_dir})", rows)

    # -- run folder -------------------------------------------------------------------------------

    def _open_log(self) -> None:
        """Rank 0 appends to ``train.log`` from here on (a header line per start)."""
        if not self.dist.is_main:
            return
        self.log_file = LogFile(self.output_dir / LOG_FILE)
        what = "resume" if self.resume is not None else "new run"
        self.log_file.header(f"fusionkit train {self.recipe.get('name') or ''} ({what}) in {self.output_dir}")

    def _record(self, message: str) -> None:
        """A line to ``train.log`` only."""
        if self.log_file is not None:
            self.log_file.write(message)

    def _early_log(self, message: str) -> None:
        from rich.console import Console

        (self.console or Console()).print(message, highlight=False)
        self._record(message)

    def _write_metrics(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` to ``metrics.jsonl`` (and, after an epoch row, rewrite ``metrics.csv``); the same
        scalars to TensorBoard (opened at the first row, when it imports)."""
        self.metrics_file.append(row)
        if not self._tensorboard_tried:
            self._tensorboard_tried = True
            resumed = self.resumed_step  # a resumed run hides the events of the abandoned steps after it
            self.tensorboard = open_writer(self.output_dir, purge_step=None if resumed is None else resumed + 1)
        if self.tensorboard is not None:
            self.tensorboard.add_row(row)

    def _write_curves(self) -> None:
        """``curves.png`` of the run's rows (none yet: nothing); a failure to draw is a log line, not an error."""
        from fusionkit.engine.plots import CURVES, draw

        jsonl = self.metrics_file.jsonl
        if not jsonl.is_file():
            return
        try:
            rows = read_rows(jsonl)
            if rows:
                atomic_write_bytes(self.output_dir / CURVES, draw({self.output_dir.name: rows}))
        except Exception as err:  # noqa: BLE001 - the training itself succeeded
            self.reporter.log(f"[yellow]{CURVES} not written: {type(err).__name__}: {err}")

    def _close_run_files(self) -> None:
        if self.tensorboard is not None:
            with contextlib.suppress(Exception):
                self.tensorboard.close()
            self.tensorboard = None
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None


def _error_line(err: BaseException) -> str:
    """How the CLI reports ``err`` (:func:`fusionkit.cli.run_command`), for ``train.log``."""
    if isinstance(err, FusionkitError):
        return one_line(err)
    if isinstance(err, KeyboardInterrupt):
        return one_line(err) if str(err) else "interrupted (Ctrl-C)"
    if isinstance(err, OSError):
        return describe_os_error(err)
    return one_line(f"{type(err).__name__}: {err}")


def train(recipe: Any, overrides: Iterable[str] = (), output_dir: str | Path | None = None,
          resume: str | Path | None = None, progress: bool | None = None, console: Any = None) -> TrainResult:
    """Load ``recipe`` (path, name or mapping) with dotlist ``overrides`` and train it.

    ``resume``: ``None`` (a fresh run; ``output_dir`` must not hold another run), ``"auto"`` (continue
    the run of ``output_dir`` from its latest checkpoint, or start fresh when there is none) or a
    checkpoint path. Ctrl-C writes a checkpoint and raises ``KeyboardInterrupt`` with a one-line message.
    """
    from fusionkit.recipes import load_recipe

    return Trainer(load_recipe(recipe, list(overrides)), output_dir, resume, progress, console).fit()

"""``fusionkit train | eval | predict | config``: the engine's commands, added to the CLI by :func:`add_command`.

    fusionkit train RECIPE [key=value ...] [--output-dir D] [--resume [CKPT]] [--no-progress]
    fusionkit config RECIPE [key=value ...] [--json]     # the resolved recipe, every train/eval default
    fusionkit eval RECIPE --checkpoint C [key=value ...] [--split val] [--corrupt SPEC ...] [--json]
    fusionkit predict RECIPE --video FILE [--checkpoint C] [key=value ...] [--topk 5] [--json]
    fusionkit predict RECIPE (--video FOLDER | --manifest FILE) (--out FILE.csv|.jsonl [--overwrite] | --json)
                      [--batch-size 8] [--no-progress] ...      # one row per clip (predict_batch)

Overrides may stand anywhere after RECIPE. Errors end as one line ``error: ...`` on stderr with exit
status 2 (:func:`fusionkit.cli.run_command`); SIGTERM during ``train`` writes a checkpoint and exits 0.

Distributed: ``torchrun --nproc_per_node N -m fusionkit train RECIPE ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any


def cmd_train(args: argparse.Namespace) -> int:
    from fusionkit.engine import distributed
    from fusionkit.engine.trainer import train

    try:
        result = train(args.recipe, args.overrides, args.output_dir, args.resume,
                       progress=False if args.no_progress else None)
    finally:
        distributed.cleanup()
    return 0 if result.status in ("finished", "max_steps", "interrupted") else 1


def cmd_eval(args: argparse.Namespace) -> int:
    from fusionkit.engine import distributed
    from fusionkit.engine.evaluate import run_eval, run_robustness

    options = {"progress": False if (args.no_progress or args.json) else None,
               "console": _quiet_console() if args.json else None}
    try:
        if args.corrupt:  # {"clean": metrics, spec: metrics, ...}
            metrics = run_robustness(args.recipe, args.checkpoint, args.corrupt, args.overrides, args.split, **options)
        else:
            metrics = run_eval(args.recipe, args.checkpoint, args.overrides, args.split, **options)
    finally:
        distributed.cleanup()
    if args.json and distributed.info().is_main:
        print(json.dumps(metrics, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fusionkit.engine.predict import render, run_predict
    from fusionkit.engine.predict_batch import is_batch

    if is_batch(args.video, args.manifest, args.out):
        return _predict_batch(args)
    out = run_predict(args.recipe, args.video, args.checkpoint, args.overrides, args.topk)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    from rich.console import Console

    Console().print(render(out["predictions"], f"{out['file']} ({out['checkpoint'] or 'no checkpoint: random heads'})"))
    return 0


def _predict_batch(args: argparse.Namespace) -> int:
    """``predict`` on a folder, a manifest, or into ``--out``: rows to the file, or JSON Lines on stdout."""
    from fusionkit.engine.predict_batch import run_predict_batch
    from fusionkit.errors import UsageError

    if args.out is None and not args.json:
        source = f"--manifest {args.manifest}" if args.manifest else f"--video: {args.video} is a directory"
        raise UsageError(f"{source}: write its predictions with --out FILE (.csv or .jsonl), or print them as "
                         "JSON Lines with --json")
    result = run_predict_batch(args.recipe, args.video, args.manifest, args.out, args.checkpoint, args.overrides,
                               args.topk, args.batch_size, args.overwrite,
                               progress=False if (args.no_progress or args.json) else None,
                               console=_quiet_console() if args.json else None)
    if args.json:
        sys.stdout.write("".join(json.dumps(row) + "\n" for row in result.rows))
    else:
        print(f"wrote {len(result.rows)} predictions to {result.out}")
    warning = result.warning()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from fusionkit.engine.config import EVAL_DEFAULTS, TRAIN_DEFAULTS
    from fusionkit.engine.show_config import render, resolved_recipe

    cfg = resolved_recipe(args.recipe, args.overrides)
    if args.json:
        print(json.dumps({"recipe": cfg, "defaults": {"train": TRAIN_DEFAULTS, "eval": EVAL_DEFAULTS}}, indent=2))
    else:
        sys.stdout.write(render(cfg))
    return 0


def _quiet_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def recipe_parser(subparsers: Any, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A sub-command taking ``RECIPE [overrides ...]``, as every engine command does (bench and inspect too)."""
    p = subparsers.add_parser(name, help=help, description=description)
    p.add_argument("recipe", help="recipe file or name in recipes/ (e.g. cast, tiny)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.base_lr=5e-4 fusion.bca.ratio=0.25")
    return p


def add_command(subparsers: Any) -> list[argparse.ArgumentParser]:
    """Add ``train``, ``eval``, ``predict`` and ``config`` to an ``add_subparsers()`` object."""
    parsers = []
    p = recipe_parser(subparsers, "train", "train a recipe on its data section (torchrun for several GPUs)",
                       "Train the model of a recipe on its data.train set, validating on data.val. Settings come "
                       "from the recipe's train section; override any key with key=value (e.g. train.epochs=10 "
                       "train.batch_size=4).")
    p.add_argument("--output-dir", default=None, help="run directory (default train.output_dir or runs/<name>)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (no value: the latest one in the run directory)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a live progress bar")
    p.set_defaults(func=cmd_train)
    parsers.append(p)

    p = recipe_parser(subparsers, "eval", "metrics of a checkpoint on the recipe's validation set(s)",
                       "Top-1/top-5 per head, mean class accuracy, action accuracy (and the harmonic mean across "
                       "several sets) of a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint written by fusionkit train")
    p.add_argument("--split", default=None, help="data section to evaluate (val or test; default eval.split)")
    p.add_argument("--corrupt", action="append", default=[], metavar="SPEC",
                   help="also evaluate under this corruption, side by side with clean (repeatable): audio_shift:2, "
                        "audio_drop:0.2, gaussian_noise:snr=10, pink_noise:snr=10, frame_drop:0.25, blur:sigma=1.5, "
                        "jpeg:quality=20, occlusion:0.25 (docs/engine.md, Robustness)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON ({clean: ..., SPEC: ...} with "
                   "--corrupt)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.set_defaults(func=cmd_eval)
    parsers.append(p)

    p = recipe_parser(subparsers, "predict", "top-5 classes per head for a clip, a folder of clips or a manifest",
                       "Decode one clip (or read a pre-decoded .safetensors clip) and print the top classes of "
                       "every head; or predict every file of a folder or every row of a manifest, batched, and "
                       "write one row per clip to --out (CSV or JSON Lines).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", help="media file (or .safetensors with video/audio tensors), or a folder of them")
    source.add_argument("--manifest", help="CSV / JSONL manifest of clips (the data.* manifest format)")
    p.add_argument("--checkpoint", default=None, help="a .safetensors checkpoint (default: untrained heads)")
    p.add_argument("--topk", type=int, default=None, help="classes per head (default eval.topk = 5)")
    p.add_argument("--batch-size", type=int, default=None, help="clips per forward pass (default eval.batch_size = 8)")
    dest = p.add_mutually_exclusive_group()
    dest.add_argument("--out", default=None, help="write one row per clip to FILE.csv or FILE.jsonl")
    dest.add_argument("--json", action="store_true", help="print JSON instead of a table (JSON Lines for many clips)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.set_defaults(func=cmd_predict)
    parsers.append(p)

    p = recipe_parser(subparsers, "config", "the resolved recipe with every train.* / eval.* key and its default",
                       "Print the recipe as `fusionkit train` runs it (bases merged, overrides applied) as YAML, its "
                       "train and eval sections with every key: '# default' keeps the default, '# default: X' "
                       "marks a changed one.")
    p.add_argument("--json", action="store_true", help="print {recipe, defaults: {train, eval}} as JSON")
    p.set_defaults(func=cmd_config)
    parsers.append(p)
    return parsers

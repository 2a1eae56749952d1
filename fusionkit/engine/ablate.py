"""``fusionkit ablate ABLATION.yaml [key=value ...] [--output-dir DIR]``: compare fusion strategies.

An ablation file names the variants to compare, the budget they share and the seeds::

    name: binding
    recipe: binding/bca            # the base recipe (a name in recipes/ or a path)
    seeds: [0]                     # 'seeds=[0,1,2]' on the command line
    data: {train: ..., test: ...}  # merged into every variant: one data set, one budget for all
    train: {epochs: 2, ...}
    eval: {...}
    pretrain:                      # optional: experts pre-trained alone first, then frozen and reused
      spatial: {recipe: binding/pretrain_spatial, expert: spatial}
    variants:
      bca: {}                                  # the base recipe itself
      bca_r25: fusion.bca.ratio=0.25           # a one-line set of overrides of the base
      late_add: binding/late_add               # another recipe
      cava: {recipe: binding/cava, overrides: [train.base_lr=1e-3]}

Every variant × seed trains in ``DIR/<variant>/seed<k>/`` (default ``runs/ablations/<name>``), is
evaluated on ``data.test`` with its final weights (no model selection on the test set), and leaves
``result.json`` there. A rerun skips finished runs and resumes interrupted ones from their last
checkpoint. A pre-training stage trains its recipe once in ``DIR/pretrain/<stage>/`` and exports the
named expert's ``state_dict`` to ``expert.safetensors``; every variant expert of the same name and
type then loads it through the recipe key ``experts.<name>.weights`` (two stages matching one
expert are an error; each result row names the stage of every pre-trained expert, ``pretrained``).

``jobs: N`` (or ``--jobs N``) runs the stages, then the variants × seeds, side by side in ``N`` worker
processes of ``cores / N`` threads each (:mod:`fusionkit.engine.jobs`), each run logging into
``DIR/logs/``; the results are the same as one after the other.

Outputs: a rich table (mean ± std over seeds per variant), ``results.json`` (one row per
variant × seed), ``results.csv`` and the bar chart ``results.png`` (see :mod:`.ablation_report`).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusionkit import feature_cache as fc
from fusionkit.engine.jobs import job_pool, run_jobs
from fusionkit.recipes import RecipeError, check_keys, load_recipe

ABLATION_KEYS = ("name", "description", "recipe", "seeds", "data", "train", "eval", "pretrain", "variants",
                 "output_dir", "feature_cache", "jobs")
MERGED = ("data", "train", "eval")  # sections of the ablation file merged into every variant
STAGE_KEYS = ("recipe", "expert", "overrides")
VARIANT_KEYS = ("recipe", "overrides")


@dataclass
class Variant:
    """One compared model: a recipe and overrides (applied after the ablation's shared sections)."""

    name: str
    recipe: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class Stage:
    """A pre-training stage: train ``recipe`` and keep the weights of its expert ``expert``."""

    name: str
    recipe: str
    expert: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class Ablation:
    """A loaded, validated ablation file."""

    name: str
    path: Path | None
    base: str
    seeds: list[int]
    shared: dict[str, Any]
    stages: list[Stage]
    variants: list[Variant]
    output_dir: str | None = None
    description: str = ""
    feature_cache_gb: float = 8.0    # 0: off (see fusionkit.feature_cache)
    jobs: int = 1                    # worker processes running runs side by side (fusionkit.engine.jobs)


# -- loading ---------------------------------------------------------------------------------------

def _overrides(value: Any, where: str) -> list[str]:
    """A one-line string is split like a shell line (quotes keep ``k={a: 1, b: 2}`` whole); list items stay whole."""
    out = shlex.split(value) if isinstance(value, str) else [str(item) for item in value or []]
    bad = [o for o in out if "=" not in o]
    if bad:
        raise RecipeError(f"{where}: override {bad[0]!r} is not of the form key=value")
    return out


def _variant(name: str, spec: Any, base: str) -> Variant:
    where = f"ablation key 'variants.{name}'"
    if spec is None or (isinstance(spec, Mapping) and not spec):
        return Variant(name, base)
    if isinstance(spec, str):
        return Variant(name, base, _overrides(spec, where)) if "=" in spec else Variant(name, spec)
    if isinstance(spec, Sequence):
        return Variant(name, base, _overrides(spec, where))
    if not isinstance(spec, Mapping):
        raise RecipeError(f"{where} must be a recipe name, a line of overrides or {{recipe, overrides}}")
    check_keys(f"variants.{name}", spec, VARIANT_KEYS, "a variant")
    return Variant(name, str(spec.get("recipe") or base), _overrides(spec.get("overrides"), where))


def _stage(name: str, spec: Any) -> Stage:
    if not isinstance(spec, Mapping) or "recipe" not in spec or "expert" not in spec:
        raise RecipeError(f"ablation key 'pretrain.{name}' needs a recipe and an expert, e.g. "
                          "{recipe: binding/pretrain_spatial, expert: spatial}")
    check_keys(f"pretrain.{name}", spec, STAGE_KEYS, "a pre-training stage")
    return Stage(name, str(spec["recipe"]), str(spec["expert"]), _overrides(spec.get("overrides"), f"pretrain.{name}"))


def _seeds(value: Any) -> list[int]:
    seeds = [value] if isinstance(value, int) else list(value or [0])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds):
        raise RecipeError(f"ablation key 'seeds' must be a list of distinct integers, got {value!r}")
    return seeds


def load_ablation(path: str | Path | Mapping[str, Any], overrides: Iterable[str] = ()) -> Ablation:
    """Read an ablation file (or mapping), apply dotlist ``overrides`` (``seeds=[0,1,2]``,
    ``train.epochs=1``), check every key; raises :class:`~fusionkit.recipes.RecipeError`."""
    from omegaconf import OmegaConf

    source = None
    if isinstance(path, Mapping):
        cfg = OmegaConf.create(dict(path))
    else:
        source = Path(path)
        if not source.is_file():
            raise RecipeError(f"ablation file {str(source)!r} not found")
        try:
            cfg = OmegaConf.load(source)
        except Exception as err:  # noqa: BLE001 - one line naming the file
            raise RecipeError(f"cannot read ablation file {source}: {err}") from err
    overrides = _overrides(list(overrides), "command line")
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    data = OmegaConf.to_container(cfg, resolve=True)
    check_keys("", data, ABLATION_KEYS, "ablation file")
    if not data.get("recipe"):
        raise RecipeError("ablation key 'recipe' (the base recipe) is missing")
    variants = data.get("variants") or {}
    if not isinstance(variants, Mapping) or not variants:
        raise RecipeError("ablation key 'variants' must map variant names to recipes or overrides")
    base = str(data["recipe"])
    name = str(data.get("name") or (source.stem if source else "ablation"))
    return Ablation(name=name, path=source, base=base, seeds=_seeds(data.get("seeds")),
                    shared={k: data[k] for k in MERGED if data.get(k) is not None},
                    stages=[_stage(k, v) for k, v in (data.get("pretrain") or {}).items()],
                    variants=[_variant(str(k), v, base) for k, v in variants.items() if v is not False],
                    output_dir=data.get("output_dir"), description=str(data.get("description") or ""),
                    feature_cache_gb=_cache_gb(data.get("feature_cache", True)), jobs=_jobs(data.get("jobs", 1)))


def _jobs(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(f"ablation key 'jobs' must be a whole number >= 1, got {value!r}")
    return value


def _cache_gb(value: Any) -> float:
    """``feature_cache``: true (8 GB), false, or ``{max_gb: N}``."""
    if isinstance(value, bool) or value is None:
        return 8.0 if value else 0.0
    if isinstance(value, Mapping):
        check_keys("feature_cache", value, ("max_gb",), "feature_cache")
        value = value.get("max_gb", 8.0)
    if not isinstance(value, (int, float)) or value < 0:
        raise RecipeError(f"ablation key 'feature_cache' must be true, false or {{max_gb: N >= 0}}, got {value!r}")
    return float(value)


def _merge(recipe: Mapping[str, Any], shared: Mapping[str, Any]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.create(dict(recipe)), OmegaConf.create(copy.deepcopy(dict(shared))))
    return OmegaConf.to_container(merged, resolve=True)


def stage_recipe(stage: Stage) -> dict[str, Any]:
    """The recipe a pre-training stage trains (its own data and budget)."""
    recipe = load_recipe(stage.recipe, stage.overrides)
    if stage.expert not in (recipe.get("experts") or {}):
        raise RecipeError(f"pretrain.{stage.name}.expert: {stage.expert!r} is not an expert of {stage.recipe}; "
                          f"experts: {sorted(recipe.get('experts') or {})}")
    return recipe


def stage_matches(recipe: Mapping[str, Any], stages: Mapping[str, tuple[str, str]]) -> dict[str, str]:
    """``{expert: stage}``: the pre-training stage (``stages``: name → (expert, type)) whose expert has
    the name and type of one of ``recipe``'s experts that names no weights of its own. Two stages for
    one expert are an error: which weights it loads must not depend on which stage finished last."""
    experts = recipe.get("experts") or {}
    out: dict[str, str] = {}
    for stage, (expert, kind) in stages.items():
        spec = experts.get(expert)
        if not (isinstance(spec, Mapping) and spec.get("type") == kind and spec.get("weights") is None):
            continue
        if expert in out:
            raise RecipeError(f"expert {expert!r} (type {kind!r}) matches pre-training stages {out[expert]!r} "
                              f"and {stage!r}; give one of them another expert name or type")
        out[expert] = stage
    return out


def variant_recipe(ablation: Ablation, variant: Variant, seed: int,
                   weights: Mapping[str, tuple[str, str, Path]] | None = None) -> dict[str, Any]:
    """The recipe of one run: the variant's recipe, the ablation's shared sections, the variant's
    overrides, ``train.seed``, and ``experts.<e>.weights`` for experts a pre-training stage made
    (``weights``: stage name → (expert, type, file); see :func:`stage_matches`)."""
    recipe = _merge(load_recipe(variant.recipe), ablation.shared)
    recipe = load_recipe(recipe, [*variant.overrides, f"train.seed={seed}"])
    weights = weights or {}
    for expert, stage in stage_matches(recipe, {s: (e, k) for s, (e, k, _) in weights.items()}).items():
        recipe["experts"][expert]["weights"] = str(weights[stage][2])
    recipe["name"] = f"{ablation.name}/{variant.name}/seed{seed}"
    return recipe


def family(recipe: Mapping[str, Any]) -> str:
    """The operator family of a recipe: its fusion operators' types; without any, ``ensemble``
    (a test-time ensemble), ``late`` (a head reads several experts) or ``identity``."""
    kinds = sorted({str(s.get("type")) for s in (recipe.get("fusion") or {}).values() if isinstance(s, Mapping)})
    if kinds:
        return "+".join(kinds)
    if (recipe.get("eval") or {}).get("ensemble"):
        return "ensemble"
    heads = [h for h in (recipe.get("heads") or {}).values() if isinstance(h, Mapping)]
    return "late" if any(len(h.get("experts") or []) > 1 for h in heads) else "identity"


def _heads_reported(recipe: Mapping[str, Any]) -> list[str]:
    groups = (recipe.get("eval") or {}).get("ensemble")
    if groups:
        return sorted(groups)
    return sorted(h for h, spec in (recipe.get("heads") or {}).items() if spec is not None)


# -- running ---------------------------------------------------------------------------------------

def _write_json(path: Path, obj: Any) -> None:
    from fusionkit.engine.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _timed_fit(recipe: Mapping[str, Any], out: Path, console: Any, progress: bool | None) -> tuple[Any, Any, float]:
    """Train (resuming from ``out``'s latest checkpoint) and return (trainer, result, train seconds so far)."""
    from fusionkit.engine.trainer import Trainer

    timing = out / "timing.json"
    before = json.loads(timing.read_text())["train_s"] if timing.is_file() else 0.0
    trainer = Trainer(recipe, out, resume="auto", progress=progress, console=console)
    t0 = time.perf_counter()
    result = trainer.fit()
    spent = before + time.perf_counter() - t0
    _write_json(timing, {"train_s": spent})
    if result.status not in ("finished", "max_steps"):
        raise KeyboardInterrupt(f"{out}: training {result.status} at step {result.step}; rerun to resume")
    return trainer, result, spent


def run_stage(stage: Stage, directory: Path, console: Any, progress: bool | None = False) -> tuple[str, Path]:
    """Pre-train one stage (or find it done); returns (expert type, exported weight file)."""
    from safetensors.torch import save_file

    recipe = stage_recipe(stage)
    kind = str(recipe["experts"][stage.expert]["type"])
    out = directory / "pretrain" / stage.name
    file = out / "expert.safetensors"
    if file.is_file():
        console.print(f"[green]pre-trained[/] {stage.name}: {file} (cached)")
        return kind, file
    console.rule(f"pre-training {stage.name} ({stage.recipe}, expert {stage.expert})")
    trainer, result, _ = _timed_fit(recipe, out, console, progress)
    state = {k: v.detach().cpu().contiguous() for k, v in trainer.model.experts[stage.expert].state_dict().items()}
    tmp = file.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"stage": stage.name, "recipe": stage.recipe, "expert": stage.expert,
                                         "metrics": json.dumps(result.metrics)})
    tmp.replace(file)
    return kind, file


def evaluate_test(trainer: Any) -> dict[str, float]:
    """Metrics of the trained model on the recipe's ``data.test`` (``data.val`` if there is none)."""
    from fusionkit.engine.config import dataset_specs
    from fusionkit.engine.evaluate import eval_loaders, evaluate_sets

    split = "test" if dataset_specs(trainer.recipe, "test") else "val"
    specs = dataset_specs(trainer.recipe, split)
    if not specs:
        raise RecipeError("ablation: the variants need data.test (or data.val) to be evaluated on")
    ecfg, cfg = trainer.eval_cfg, trainer.cfg
    loaders = eval_loaders(specs, int(ecfg["batch_size"]), int(ecfg["num_workers"]), int(cfg["seed"]), split)
    return evaluate_sets(trainer.model, loaders, trainer.device, ecfg["precision"] or cfg["precision"],
                         cfg["action"], tuple(ecfg["ks"]))


def run_variant(ablation: Ablation, variant: Variant, seed: int, directory: Path,
                weights: Mapping[str, tuple[str, str, Path]], info: Mapping[str, Any], console: Any,
                progress: bool | None) -> dict[str, Any]:
    """Train and evaluate one variant × seed (or read its finished ``result.json``); its result row."""
    out = directory / variant.name / f"seed{seed}"
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    recipe = variant_recipe(ablation, variant, seed, weights)
    trainer, result, spent = _timed_fit(recipe, out, console, progress)
    metrics = evaluate_test(trainer)
    heads = [h for h in _heads_reported(recipe) if f"{h}/top1" in metrics]
    row = {"variant": variant.name, "seed": seed, "operator": info["operator"],
           "params_trainable": info["params_trainable"], "params_total": info["params_total"],
           "pretrained": dict(info.get("pretrained") or {}),
           "gflops": info["gflops"], "train_s": round(spent, 2), "steps": result.step,
           "heads": heads, "headline": sum(metrics[f"{h}/top1"] for h in heads) / max(len(heads), 1),
           "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    _write_json(done, row)
    return row


def describe_variants(ablation: Ablation) -> dict[str, dict[str, Any]]:
    """Validate every variant's recipe (built on the meta device, no weights) and count its
    parameters and GFLOPs per clip; fails before anything is trained."""
    from fusionkit.describe import describe

    stages = {s.name: (s.expert, str(stage_recipe(s)["experts"][s.expert]["type"])) for s in ablation.stages}
    out = {}
    for variant in ablation.variants:
        recipe = variant_recipe(ablation, variant, ablation.seeds[0])
        try:
            info = describe(recipe)
            pretrained = stage_matches(recipe, stages)
        except RecipeError as err:
            raise RecipeError(f"variant {variant.name!r} ({variant.recipe}): {err}") from err
        out[variant.name] = {"operator": family(recipe), "params_trainable": info["params_trainable"],
                             "params_total": info["params_total"], "gflops": round(info["gflops"], 4),
                             "cost": training_cost(info), "pretrained": pretrained}
    return out


def training_cost(info: Mapping[str, Any]) -> float:
    """A variant's relative cost per training step, to start the longest runs first: its forward
    GFLOPs, three times over (forward and backward) for the share of expert steps the frozen-feature
    cache cannot skip, a fifth for the rest (computed once, then read back)."""
    steps = dict(info.get("cacheable_steps") or {})
    of = steps.pop("of", 0)
    fixed = sum(steps.values()) / (of * len(steps)) if of and steps else 0.0
    return float(info["gflops"]) * (3 * (1 - fixed) + 0.2 * fixed)


def run_ablation(ablation: Ablation | str | Path, overrides: Iterable[str] = (), output_dir: str | Path | None = None,
                 progress: bool | None = None, console: Any = None) -> list[dict[str, Any]]:
    """Run every pre-training stage and variant × seed (skipping finished ones); write the reports.
    Returns the result rows (one per variant × seed)."""
    from rich.console import Console

    from fusionkit.engine.ablation_report import write_reports

    console = console or Console(width=None if Console().is_terminal else 150)
    started = time.perf_counter()
    if not isinstance(ablation, Ablation):
        ablation = load_ablation(ablation, overrides)
    directory = Path(output_dir or ablation.output_dir or Path("runs") / "ablations" / ablation.name)
    infos = describe_variants(ablation)
    directory.mkdir(parents=True, exist_ok=True)
    shared = prepare_data(ablation) if ablation.jobs > 1 else []
    with job_pool(ablation.jobs) as pool:
        if shared:
            decode_data(shared, directory, console, pool, ablation.jobs)
        weights = _run_stages(ablation, directory, console, progress, pool)
        rows = _run_variants(ablation, directory, weights, infos, console, progress, pool)
    paths = write_reports(rows, directory, ablation.name, console)
    console.print(f"wall time of this call: {_clock(time.perf_counter() - started)}; results: {paths['json']}, "
                  f"{paths['csv']}, {paths['md']}; plot: [bold]{paths['png']}[/]")
    return rows


def prepare_data(ablation: Ablation) -> list[Mapping[str, Any]]:
    """Open every data set the stages and variants read, once, in this process: a set generated on
    first use (the binding benchmark) is then written here, not by every worker at the same time.
    Returns the specs of the sets whose decoding the workers can share (:func:`decode_data`)."""
    from fusionkit.engine.config import dataset_specs
    from fusionkit.engine.loading import build_dataset

    recipes = [stage_recipe(s) for s in ablation.stages]
    recipes += [variant_recipe(ablation, v, ablation.seeds[0]) for v in ablation.variants]
    seen: set[str] = set()
    shared = []
    for recipe in recipes:
        for split in ("train", "val", "test"):
            for name, spec in dataset_specs(recipe, split).items():
                key = json.dumps(spec, sort_keys=True, default=str)
                if key not in seen:
                    seen.add(key)
                    dataset = build_dataset(spec, f"data.{split}.{name}")
                    if getattr(dataset, "decoded_cache_dir", None) and getattr(dataset, "reads_fixed", False):
                        shared.append(spec)
    return shared


def _decode_job(spec: Mapping[str, Any], shard: int, shards: int, console: Any = None) -> int:
    from fusionkit.engine.loading import build_dataset

    return build_dataset(spec).decode_all(shard, shards)


def decode_data(specs: Sequence[Mapping[str, Any]], directory: Path, console: Any, pool: Any,
                shards: int) -> None:
    """Decode every clip of the sets ``specs`` once, shared out over the pool's workers, into each
    set's decoded-media folder: every later run of every worker reads the decoded clips from there
    instead of decoding them itself (``fusionkit.data.memo``)."""
    started = time.perf_counter()
    jobs = [((spec, k, shards), directory / "logs" / f"decode-{k}.log") for spec in specs
            for k in range(shards)]
    with console.status(f"decoding {len(specs)} data sets once for all workers ({shards} processes)"):
        clips = sum(n for _, n in run_jobs(pool, _decode_job, jobs))
    console.print(f"decoded {clips} clips of {len(specs)} data sets once for all workers in "
                  f"{time.perf_counter() - started:.0f} s")


def _run_stages(ablation: Ablation, directory: Path, console: Any, progress: bool | None,
                pool: Any) -> dict[str, tuple[str, str, Path]]:
    """Every pre-training stage, here or in the pool's workers; stage name → (expert, type, weight file)."""
    if pool is None:
        return {s.name: (s.expert, *run_stage(s, directory, console, progress)) for s in ablation.stages}
    if ablation.stages:
        console.print(f"pre-training {len(ablation.stages)} stages in {ablation.jobs} worker processes "
                      f"(logs: {directory / 'logs'})")
    logs = [directory / "logs" / f"pretrain-{stage.name}.log" for stage in ablation.stages]
    weights = {}
    for i, (kind, file) in run_jobs(pool, run_stage, [((s, directory), log) for s, log in zip(ablation.stages, logs)]):
        weights[ablation.stages[i].name] = (ablation.stages[i].expert, kind, file)
        console.print(f"[green]pre-trained[/] {ablation.stages[i].name}: {file} (log: {logs[i]})")
    return weights


_WORKER_CACHE: dict[float, Any] = {}  # a worker process's frozen-feature cache, shared by its jobs


def _variant_job(ablation: Ablation, variant: Variant, seed: int, directory: Path,
                 weights: Mapping[str, tuple[str, str, Path]], info: Mapping[str, Any], console: Any,
                 progress: bool | None = False, cache: Any = None) -> dict[str, Any]:
    """:func:`run_variant` with the frozen-feature cache on (``cache``, else this process's own)."""
    if cache is None and ablation.feature_cache_gb:
        cache = _WORKER_CACHE.setdefault(ablation.feature_cache_gb, fc.FeatureCache(ablation.feature_cache_gb))
    with fc.enabled(cache):
        return run_variant(ablation, variant, seed, directory, weights, info, console, progress)


def _run_variants(ablation: Ablation, directory: Path, weights: Mapping[str, tuple[str, str, Path]],
                  infos: Mapping[str, Mapping[str, Any]], console: Any, progress: bool | None,
                  pool: Any) -> list[dict[str, Any]]:
    """Every variant × seed, seed-major (a whole table early), here or in the pool's workers."""
    runs = [(v, s) for s in ablation.seeds for v in ablation.variants]
    done = [(directory / v.name / f"seed{s}" / "result.json").is_file() for v, s in runs]
    rows: list[Any] = [None] * len(runs)
    t0, fresh = time.perf_counter(), 0
    if pool is None:
        cache = fc.FeatureCache(ablation.feature_cache_gb) if ablation.feature_cache_gb else None
        for k, (variant, seed) in enumerate(runs):
            eta = "" if not fresh else f", ETA {_clock((time.perf_counter() - t0) / fresh * (len(runs) - k))}"
            console.rule(f"[{k + 1}/{len(runs)}] {variant.name} seed {seed} ({infos[variant.name]['operator']}"
                         f"{', finished' if done[k] else ''}{eta})")
            rows[k] = _variant_job(ablation, variant, seed, directory, weights, infos[variant.name], console,
                                   progress, cache=cache)
            fresh += not done[k]
        if cache is not None:
            stats = cache.stats()
            console.print(f"frozen-feature cache: {stats['entries']:.0f} entries, {stats['gb']:.2f} GB, "
                          f"hit rate {stats['hit_rate']:.0%}")
        return rows
    console.print(f"{len(runs)} runs ({sum(done)} finished before) in {ablation.jobs} worker processes "
                  f"(logs: {directory / 'logs'})")
    order = sorted(range(len(runs)), key=lambda i: (done[i], -infos[runs[i][0].name].get("cost", 0.0), i))
    jobs = [((ablation, runs[i][0], runs[i][1], directory, weights, infos[runs[i][0].name]),
             directory / "logs" / f"{runs[i][0].name}-seed{runs[i][1]}.log") for i in order]
    for n, (j, row) in enumerate(run_jobs(pool, _variant_job, jobs), 1):  # the costliest runs first
        k = order[j]
        rows[k] = row
        fresh += not done[k]
        left = sum(1 for i, r in enumerate(rows) if r is None and not done[i])
        eta = f", ETA {_clock((time.perf_counter() - t0) / fresh * left)}" if fresh and left else ""  # wall per run
        console.print(f"[{n}/{len(runs)}] {runs[k][0].name} seed {runs[k][1]} ({row['operator']}): headline "
                      f"{row['headline']:.1f} %, train {row['train_s']:.0f} s{', finished before' if done[k] else ''}"
                      f"{eta}")
    return rows


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


# -- command line ----------------------------------------------------------------------------------

def cmd_ablate(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"jobs={args.jobs}"] if args.jobs is not None else [])
    run_ablation(args.ablation, overrides, args.output_dir, progress=False if args.no_progress else None)
    return 0


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``ablate`` to an ``add_subparsers()`` object."""
    p = subparsers.add_parser("ablate", help="train, evaluate and compare the variants of an ablation file",
                              description="Train every variant x seed of an ablation file (resumable), evaluate "
                              "each on data.test, and write a table, results.json/csv and a bar chart.")
    p.add_argument("ablation", help="ablation file, e.g. recipes/ablations/binding.yaml")
    p.add_argument("overrides", nargs="*", help="dotlist overrides of the ablation file, e.g. 'seeds=[0,1,2]' "
                   "train.epochs=1")
    p.add_argument("--output-dir", default=None, help="default: runs/ablations/<name>")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of live progress bars")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="runs side by side in N worker processes (each with cores/N threads; their logs in "
                   "DIR/logs/); default: the file's 'jobs' key, else 1")
    p.set_defaults(func=cmd_ablate)
    return p

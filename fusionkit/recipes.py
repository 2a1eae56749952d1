"""Recipes: omegaconf YAML files that describe a model, with ``_base_`` inheritance and overrides.

A recipe reads like the paper's figure::

    inputs:                      # one sample's shape per modality (sizes the operators)
      video: [3, 16, 224, 224]
    experts:
      spatial:  {type: clip_vit, name: ViT-B-16, frame_select: {stride: 2, offset: 1}, adapters: {ratio: 0.25}}
      temporal: {type: videomae_vit, size: B, num_frames: 16, adapters: {ratio: 0.25}}
    fusion:
      bca:
        type: bca
        experts: [spatial, temporal]
        steps: null              # every graph step; or a list of steps, or "9:12"
        directions:
          t2s: {query: spatial, key: temporal, window: time}
          s2t: {query: temporal, key: spatial, window: space}
    heads:
      verb: {type: linear, expert: temporal, classes: 97}
      noun: {type: linear, expert: spatial, classes: 300}
    trainable: {unfreeze: ["experts.*.pool_norm.*"]}
    drop_path: 0.2

``_base_: other.yaml`` (or a list) merges the named recipes first (paths relative to the file). An entry of
``experts``, ``fusion``, ``heads`` or ``data`` whose ``type`` a later file or override changes replaces the
inherited entry instead of merging into it (:func:`merge`).

A recipe is a file path or a name on the recipe search path (:func:`recipe_dirs`): the folders of
``$FUSIONKIT_RECIPES`` (``os.pathsep``-separated), then the recipes installed with the package (the
data package ``fusionkit._recipes``, which pyproject.toml maps onto the repository's ``recipes/``
folder), then the folders plugins add with :func:`register_recipe_dir`. ``cast`` is ``cast.yaml``,
``binding/bca`` is ``binding/bca.yaml`` of the first folder that has it; :func:`list_recipes` names
them all.

Overrides are dotlist strings, ``fusion.bca.ratio=0.25``; ``null`` removes an inherited entry
(``fusion.bca=null`` is the identity baseline, ``experts.spatial: null`` drops an expert).
Every key is validated against the registered class it configures before anything is built: a
typo fails with one message naming the key and the closest valid keys.

Graph-level keys inside a section (not passed to the registered class): experts take ``type``,
``adapters``, ``align`` and ``weights`` (a file holding the built expert's own ``state_dict``, loaded
strictly before adapters are attached: how a pre-trained expert of an earlier run is reused); operators ``type``, ``experts``, ``site`` and ``steps``; heads ``type`` and
``target`` (the label the head trains on, by default its own name: two heads of a test-time
ensemble both train on ``verb``).
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import inspect
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fusionkit.adapters import attach_adapters
from fusionkit.errors import FusionkitError
from fusionkit.experts.pretrained import load_into, read_state_dict
from fusionkit.graph import FusionModel, OperatorSpec, linear_rates
from fusionkit.registry import EXPERTS, FRONTENDS, FUSIONS, HEADS, Registry, closest, load_plugins
from fusionkit.trainable import TrainablePolicy

RECIPES_PACKAGE = "fusionkit._recipes"  # the recipe YAML files installed with fusionkit (pyproject.toml)
RECIPES_ENV = "FUSIONKIT_RECIPES"  # os.pathsep-separated folders searched before the packaged recipes
SECTIONS = ("name", "description", "inputs", "experts", "fusion", "heads", "trainable", "drop_path",
            "data", "train", "eval")  # data / train / eval configure the engine (fusionkit.engine)
RANGE = re.compile(r"^-?\d*:-?\d*$")  # "9:12": YAML 1.1 would read an unquoted 9:12 as the base-60 int 552
EXPERT_KEYS = ("type", "adapters", "align", "weights")
OPERATOR_KEYS = ("type", "experts", "site", "steps")
HEAD_KEYS = ("type", "target")  # target: the label a head trains on (default: its name)
GRAPH_GIVEN = ("experts", "dims", "layouts", "drop_path")  # filled in by the graph
ADAPTER_KEYS = ("attn", "mlp", "ratio", "mlp_scale", "layers")
TRAINABLE_KEYS = ("unfreeze", "freeze")


class RecipeError(FusionkitError, ValueError):
    """A recipe that cannot be loaded or built; the message names the key."""


def packaged_recipe_dir() -> Path:
    """The folder of the recipes installed with fusionkit, found through :mod:`importlib.resources`.

    From a wheel it is ``site-packages/fusionkit/_recipes``; in an editable install (``make``,
    ``pip install -e .``) the data package ``fusionkit._recipes`` is the repository's ``recipes/``
    folder itself (``[tool.setuptools.package-dir]`` in pyproject.toml), so edits there are seen at once.
    """
    try:
        root = importlib.resources.files(RECIPES_PACKAGE)
    except ModuleNotFoundError:
        # a source checkout on sys.path, or an editable install made before the data package existed
        # (re-running ``pip install -e .``, which ``make`` does when pyproject.toml changes, maps it)
        return Path(__file__).resolve().parent.parent / "recipes"
    if not isinstance(root, Path):  # e.g. a zip import: _base_ paths need a real folder
        raise RecipeError(f"the packaged recipes ({RECIPES_PACKAGE}) are not a folder on disk ({root!r}); "
                          "install fusionkit as a plain (unzipped) package")
    return root


RECIPE_DIR = packaged_recipe_dir()
_registered_dirs: list[Path] = []


def register_recipe_dir(path: str | os.PathLike[str]) -> Path:
    """Add a folder of recipe files to the search path, after ``$FUSIONKIT_RECIPES`` and the packaged
    recipes (a name that already exists there keeps its first meaning; a path still reaches the file).

    Meant for plugins: the module that a ``fusionkit.plugins`` entry point names calls it on import,
    e.g. ``register_recipe_dir(importlib.resources.files("my_package") / "recipes")``; the plugins are
    loaded before any recipe is looked up. Returns the absolute folder; registering it twice is a no-op.
    """
    folder = Path(path).expanduser().absolute()
    if not folder.is_dir():
        raise RecipeError(f"register_recipe_dir: {str(path)!r} is not a folder")
    if folder not in _registered_dirs:
        _registered_dirs.append(folder)
    return folder


def recipe_dirs() -> list[Path]:
    """The recipe search path, in order: the folders of ``$FUSIONKIT_RECIPES`` (``os.pathsep``-separated,
    e.g. ``~/my_recipes:/shared/recipes``), the packaged recipes (:func:`packaged_recipe_dir`), then the
    folders added by :func:`register_recipe_dir` (plugins)."""
    load_plugins()
    env = [Path(p).expanduser().absolute() for p in os.environ.get(RECIPES_ENV, "").split(os.pathsep) if p]
    return list(dict.fromkeys([*env, RECIPE_DIR, *_registered_dirs]))


def _names_in(folder: Path) -> dict[str, Path]:
    """``{name: file}`` of the recipe files under ``folder`` (``binding/bca`` for ``binding/bca.yaml``);
    ablation files (an ``ablations/`` folder, run by ``fusionkit ablate``) are not recipes."""
    if not folder.is_dir():
        return {}
    files = sorted(p for p in folder.rglob("*.yaml") if "ablations" not in p.relative_to(folder).parts[:-1])
    return {p.relative_to(folder).with_suffix("").as_posix(): p for p in files if p.is_file()}


def recipe_index() -> dict[str, Path]:
    """Every recipe name on the search path with the file it means (the first folder that has it wins)."""
    index: dict[str, Path] = {}
    for folder in recipe_dirs():
        for name, file in _names_in(folder).items():
            index.setdefault(name, file)
    return dict(sorted(index.items()))


def list_recipes() -> list[str]:
    """The names of the recipes on the search path (:func:`recipe_dirs`), sorted: what
    ``fusionkit.build(name)`` and every ``fusionkit`` command taking a recipe accept."""
    return list(recipe_index())


def recipe_description(path: Path) -> str:
    """The first line of a recipe file's own ``description`` (``fusionkit list``); empty if none."""
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - a listing must not fail on one broken file
        return f"(unreadable: {type(err).__name__})"
    text = str(cfg.get("description") or "") if isinstance(cfg, DictConfig) else ""
    return text.strip().splitlines()[0] if text.strip() else ""


def recipe_path(recipe: str | os.PathLike[str]) -> Path:
    """The recipe file that a path or a name means.

    An existing file is itself. Otherwise the name is looked up on the search path
    (:func:`recipe_dirs`): the folders of ``$FUSIONKIT_RECIPES`` first, then the packaged recipes,
    then plugin folders. ``cast`` means ``cast.yaml``, ``binding/bca`` ``binding/bca.yaml``; a
    relative path that is not a file here is tried by its trailing parts (``recipes/cast.yaml``
    finds the packaged ``cast.yaml`` from any directory). Not found: a :class:`RecipeError` naming the
    folders searched and the closest names.
    """
    if not str(recipe).strip():
        raise RecipeError("recipe name is empty: give a file or a name such as 'tiny' (fusionkit list)")
    path = Path(recipe)
    if path.is_file():
        return path
    dirs = recipe_dirs()
    named = path if path.suffix in (".yaml", ".yml") else path.with_name(path.name + ".yaml")
    parts = named.parts if not named.is_absolute() else named.parts[-1:]
    for start in range(len(parts)):
        tail = Path(*parts[start:])
        for folder in dirs:
            if (folder / tail).is_file():
                return folder / tail
    hint = ", ".join(closest(named.with_suffix("").as_posix(), list_recipes())) or "(none)"
    raise RecipeError(f"recipe {str(recipe)!r} not found (neither a file nor a name in "
                      f"{os.pathsep.join(str(d) for d in dirs)}); closest recipes: {hint}")


def _load_file(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"recipe {path} inherits from itself through _base_")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
        if mark is not None and problem:  # a YAML syntax error: file:line:column
            context = getattr(err, "context", None)
            raise RecipeError(f"YAML syntax error in recipe {path}:{mark.line + 1}:{mark.column + 1}: {problem}"
                              + (f" ({context})" if context else "")) from err
        raise RecipeError(f"cannot read recipe {path}: {err}") from err
    if not isinstance(cfg, DictConfig):
        raise RecipeError(f"recipe {path} is not a mapping")
    bases = cfg.pop("_base_", None)
    merged = OmegaConf.create()
    for base in [] if bases is None else [bases] if isinstance(bases, str) else list(bases):
        merged = merge(merged, _load_file(_base_path(path, str(base)), (*seen, path)))
    migrate_renamed(cfg, str(path), merged)
    return merge(merged, cfg) if bases is not None else cfg


# keys renamed so that one name has one meaning: (section pattern, old, new). The old names still load
# (stored run recipes, users' files and overrides) with a FutureWarning; every shipped recipe uses the new ones.
RENAMED = (("fusion.*", "layers", "steps"),                   # graph steps (an adapter's `layers` are expert layers)
           ("experts.*", "frames", "frame_select"),            # which frames an expert sees (data: clip length)
           ("experts.*.frontend", "frames", "target_length"))  # fbank frames per spectrogram image, as `fbank`
_RENAMED_IN = {"fusion": FUSIONS, "experts": EXPERTS, "frontend": FRONTENDS}


def _matches(cfg: Any, pattern: Sequence[str], path: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    """``(path, node)`` of every mapping in ``cfg`` at the dotted ``pattern`` (``*``: any key)."""
    if not pattern:
        yield path, cfg
        return
    if not isinstance(cfg, (Mapping, DictConfig)):
        return
    for key in (list(cfg) if pattern[0] == "*" else [pattern[0]] if pattern[0] in cfg else []):
        yield from _matches(cfg[key], pattern[1:], (*path, str(key)))


def _keeps_old_name(path: tuple[str, ...], node: Any, context: Any, old: str, new: str) -> bool:
    """Whether the registered class at ``path`` takes ``old`` itself (a plugin's own ``frames``)."""
    kind = node.get("type") if "type" in node else OmegaConf.select(OmegaConf.create(context or {}),
                                                                     ".".join(path + ("type",)))
    registry = _RENAMED_IN[path[-1] if path[-1] == "frontend" else path[0]]
    if not isinstance(kind, str) or kind not in registry.names():
        return False
    names, _ = accepted_keys(registry.get(kind))
    return old in names and new not in names


def migrate_renamed(cfg: Any, where: str, context: Any = None) -> None:
    """Rename the old keys of :data:`RENAMED` in ``cfg`` (one recipe file, mapping or override set) in place;
    ``context`` (the recipe it extends) gives the ``type`` of a section the file does not restate."""
    for pattern, old, new in RENAMED:
        for path, node in list(_matches(cfg, pattern.split("."))):
            if not isinstance(node, (Mapping, DictConfig)) or old not in node \
                    or _keeps_old_name(path, node, context, old, new):
                continue
            at = ".".join(path)
            if new in node:
                raise RecipeError(f"recipe {where}: {at}.{old} is the old name of {at}.{new}; give only {new}")
            node[new] = node.pop(old)
            warnings.warn(f"recipe key {at}.{old} is now {at}.{new} ({where}); the old name still works",
                          FutureWarning, stacklevel=2)


TYPED_SECTIONS = ("experts", "fusion", "heads", "data")


def merge(base: DictConfig, update: DictConfig) -> DictConfig:
    """``update`` merged over ``base``; an entry of a typed section (``experts.X``, ``fusion.X``, ``heads.X``,
    ``data.X``) whose ``type`` the update changes replaces the inherited entry instead of merging into it
    (a manifest split over ``tiny``'s synthetic one keeps none of its keys)."""
    base = copy.deepcopy(base)
    for section in TYPED_SECTIONS:
        old, new = base.get(section), update.get(section)
        if not isinstance(old, DictConfig) or not isinstance(new, DictConfig):
            continue
        for name, entry in new.items():
            inherited = old.get(name)
            if isinstance(entry, DictConfig) and isinstance(inherited, DictConfig) and "type" in entry \
                    and entry.get("type") != inherited.get("type"):
                old[name] = None  # dropped, then set afresh by the merge
    return OmegaConf.merge(base, update)


def _base_path(path: Path, base: str) -> Path:
    """The file a ``_base_`` entry of recipe ``path`` means: a path relative to it (or absolute) when that
    file exists, else a recipe name on the search path (``_base_: tiny`` in a plugin's recipe), skipping
    ``path`` itself (a ``tiny.yaml`` that shadows the packaged one may inherit from it by name)."""
    near = path.parent / base
    if near.is_file() or Path(base).is_absolute():
        return near
    named = Path(base if Path(base).suffix in (".yaml", ".yml") else base + ".yaml")
    for folder in recipe_dirs():
        if (folder / named).is_file() and (folder / named).resolve() != path.resolve():
            return folder / named
    hint = ", ".join(closest(named.with_suffix("").as_posix(), list_recipes())) or "(none)"
    raise RecipeError(f"recipe {path}: _base_ {base!r} is neither a file beside it nor a recipe name on the search "
                      f"path; closest recipes: {hint}")


def load_recipe(recipe: str | os.PathLike[str] | Mapping[str, Any] | DictConfig,
                overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Load a recipe (path, name, or mapping), resolve ``_base_``, apply dotlist overrides, validate
    the top-level sections; returns a plain dict."""
    if isinstance(recipe, (str, os.PathLike)):
        cfg = _load_file(recipe_path(recipe))
    else:
        cfg = OmegaConf.create(recipe if isinstance(recipe, DictConfig) else dict(recipe))
        migrate_renamed(cfg, "mapping")
    overrides = list(overrides)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise RecipeError(f"override {bad[0]!r} is not of the form key=value (e.g. fusion.bca.ratio=0.25)")
    if overrides:
        quoted = []
        for item in overrides:
            key, _, value = item.partition("=")
            quoted.append(f"{key}='{value}'" if RANGE.match(value.strip()) else item)
        given = OmegaConf.from_dotlist(quoted)
        migrate_renamed(given, "override", cfg)
        cfg = merge(cfg, given)
    data = OmegaConf.to_container(cfg, resolve=True)
    check_keys("", data, SECTIONS, "recipe")
    return data


def check_keys(path: str, options: Mapping[str, Any], valid: Sequence[str], what: str) -> None:
    """Raise :class:`RecipeError` for the first key of ``options`` not in ``valid``."""
    for key in options:
        if key not in valid:
            where = f"{path}.{key}" if path else key
            hint = ", ".join(closest(str(key), list(valid))) or "(none)"
            raise RecipeError(f"recipe key {where!r} is not valid for {what}; closest valid keys: {hint}")


def accepted_keys(obj: Any) -> tuple[list[str], bool]:
    """Keyword names that a class or function accepts, and whether it takes ``**kwargs``."""
    sig = inspect.signature(obj)
    names = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def _section_class(path: str, spec: Any, registry: Registry[Any]) -> type:
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise RecipeError(f"recipe key {path!r} needs a 'type' (one of: {', '.join(registry.names())})")
    try:
        return registry.get(spec["type"])
    except KeyError as err:
        raise RecipeError(f"{path}.type: {err}") from err


def _check_options(path: str, spec: Mapping[str, Any], cls: type, graph_keys: Sequence[str],
                   given: Sequence[str] = ()) -> dict[str, Any]:
    options = {k: v for k, v in spec.items() if k not in graph_keys}
    names, var_kw = accepted_keys(cls)
    for key in options:
        if key in given:
            raise RecipeError(f"recipe key {path}.{key!r} is set by the fusion graph, not by the recipe")
    if not var_kw:
        check_keys(path, options, [*graph_keys, *(n for n in names if n not in given)],
                   f"{spec['type']!r} ({cls.__name__})")
    hook = getattr(cls, "check_options", None)  # combinations a class rejects, e.g. bca's ratio with mode: full
    if hook is not None:
        _build(path, hook, options={k: v for k, v in options.items() if k not in graph_keys})
    return options


def _on_meta(cls: type) -> Any:
    @functools.wraps(cls)
    def build(**kwargs: Any) -> Any:
        with torch.device("meta"):
            return cls(**kwargs)
    return build


def _dry_build(path: str, cls: type, options: Mapping[str, Any]) -> None:
    """An expert whose factory takes ``**kwargs`` (timm, open_clip) is built once on the meta device
    without weights (no memory, no initialisation, a fraction of a second), so that a key the library
    behind it does not take fails before anything is built. Only that error is reported here: anything
    else the meta device cannot do is left to the real build."""
    names, var_kw = accepted_keys(cls)
    if not var_kw or getattr(cls, "needs_experts", ()):
        return
    dry = {k: v for k, v in options.items() if k not in EXPERT_KEYS}
    if "pretrained" in names:
        dry["pretrained"] = None
    try:
        _build(path, _on_meta(cls), **dry)
    except RecipeError as err:
        if isinstance(err.__cause__, TypeError) and UNEXPECTED_KWARG.search(str(err.__cause__)):
            raise
    except Exception:  # noqa: BLE001 - not a configuration error: the real build reports it
        pass


def _present(section: Any) -> Iterable[tuple[str, Any]]:
    return ((name, spec) for name, spec in (section or {}).items() if spec is not None)  # null removes an entry


def check_config(cfg: Mapping[str, Any]) -> None:
    """Every section of a loaded recipe checked before any module is built: section types, every
    key of every expert (those of ``**kwargs`` factories by a build on the meta device), adapter,
    operator and head, and the trainable section. Raises :class:`RecipeError` naming the key."""
    for name, spec in _present(cfg.get("experts")):
        path = f"experts.{name}"
        cls = _section_class(path, spec, EXPERTS)
        options = _check_options(path, spec, cls, EXPERT_KEYS)
        if isinstance(spec.get("adapters"), Mapping):
            check_keys(f"{path}.adapters", spec["adapters"], ADAPTER_KEYS, "adapters")
        _dry_build(path, cls, options)
    for section, registry, keys, given in (("fusion", FUSIONS, OPERATOR_KEYS, GRAPH_GIVEN),
                                           ("heads", HEADS, HEAD_KEYS, ("dims", "name"))):
        for name, spec in _present(cfg.get(section)):
            _check_options(f"{section}.{name}", spec, _section_class(f"{section}.{name}", spec, registry), keys,
                           given)
    check_keys("trainable", dict(cfg.get("trainable") or {}), TRAINABLE_KEYS, "trainable")


def _steps(path: str, selection: Any, num_steps: int) -> list[int]:
    if selection is None:
        return list(range(num_steps))
    if isinstance(selection, str) and RANGE.match(selection):
        start, _, stop = selection.partition(":")
        steps = list(range(num_steps))[slice(int(start) if start else None, int(stop) if stop else None)]
        if not steps:
            raise RecipeError(f"{path}.steps: range {selection!r} selects no step of the graph's {num_steps} steps "
                              f"(0-{num_steps - 1})")
        return steps
    if isinstance(selection, int):
        selection = [selection]
    if not isinstance(selection, Sequence) or not all(isinstance(i, int) for i in selection):
        raise RecipeError(f"{path}.steps must be null, a list of steps or 'start:stop', got {selection!r}")
    bad = [i for i in selection if not -num_steps <= i < num_steps]
    if bad:
        raise RecipeError(f"{path}.steps: steps {bad} outside the graph's {num_steps} steps")
    return sorted({i % num_steps for i in selection})


UNEXPECTED_KWARG = re.compile(r"unexpected keyword argument '(\w+)'")


def _build(path: str, fn: Any, **kwargs: Any) -> Any:
    """Call ``fn(**kwargs)``, re-raising configuration errors as a :class:`RecipeError` naming the key
    (``experts.spatial.img_sze`` for an option that a ``**kwargs`` factory passed on to a class that
    does not take it, with the closest valid keys)."""
    try:
        return fn(**kwargs)
    except FusionkitError:
        raise
    except TypeError as err:
        m = UNEXPECTED_KWARG.search(str(err))
        if m and m.group(1) in kwargs:
            key = m.group(1)
            try:
                names, _ = accepted_keys(fn)
            except (TypeError, ValueError):  # no signature to read
                names = []
            hint = ", ".join(closest(key, [k for k in dict.fromkeys([*names, *kwargs]) if k != key])) or "(none)"
            raise RecipeError(f"recipe key '{path}.{key}' is not a valid option ({err}); closest valid keys: "
                              f"{hint}") from err
        raise RecipeError(f"{path}: {err}") from err
    except (ValueError, KeyError, ArithmeticError, IndexError) as err:
        raise RecipeError(f"{path}: {type(err).__name__ + ': ' if isinstance(err, ArithmeticError) else ''}"
                          f"{err}") from err


def expert_modalities(cfg: Mapping[str, Any]) -> dict[str, str]:
    """``{expert: modality it reads}`` of a loaded recipe, without building anything: the spec's
    ``modality``, else the registered class's default (its ``modality`` argument or attribute)."""
    out = {}
    for name, spec in _present(cfg.get("experts")):
        if spec.get("modality") is not None:
            out[name] = str(spec["modality"])
            continue
        cls = _section_class(f"experts.{name}", spec, EXPERTS)
        try:
            param = inspect.signature(cls).parameters.get("modality")
        except (TypeError, ValueError):
            param = None
        default = param.default if param is not None and param.default is not inspect.Parameter.empty else None
        out[name] = str(default or getattr(cls, "modality", "video"))
    return out



def build_from_config(cfg: Mapping[str, Any]) -> FusionModel:
    """Build the model a loaded recipe describes (see :func:`build`)."""
    check_config(cfg)
    inputs = {k: v for k, v in (cfg.get("inputs") or {}).items() if v is not None}  # null removes an input
    if not inputs:
        raise RecipeError("recipe key 'inputs' is missing: give one sample's shape per modality, "
                          "e.g. inputs: {video: [3, 16, 224, 224]}")
    drop_path = float(cfg.get("drop_path") or 0.0)
    expert_specs = {k: v for k, v in (cfg.get("experts") or {}).items() if v is not None}  # null removes one
    experts, align = {}, {}
    for name, spec in expert_specs.items():
        path = f"experts.{name}"
        cls = _section_class(path, spec, EXPERTS)
        options = _check_options(path, spec, cls, EXPERT_KEYS)
        for key in getattr(cls, "needs_experts", ()):  # e.g. shared: {expert: video} gets the built expert
            if options.get(key) not in experts:
                raise RecipeError(f"{path}.{key}: {options.get(key)!r} is not an expert defined above it; "
                                  f"defined so far: {list(experts)}")
            options[key] = experts[options[key]]
        experts[name] = _build(path, cls, **options)
        if spec.get("weights") is not None:  # the expert's own state dict, e.g. from an earlier pre-training run
            load_into(experts[name], read_state_dict(spec["weights"]), f"{path}.weights ({spec['weights']})")
        if spec.get("align") is not None:
            align[name] = list(spec["align"])
            if len(align[name]) != experts[name].depth:
                raise RecipeError(f"{path}.align lists {len(align[name])} steps but the expert has "
                                  f"{experts[name].depth} layers (one step per layer)")
    if not experts:
        raise RecipeError("recipe key 'experts' is empty: a model needs at least one expert")
    steps_of = {e: align.get(e, list(range(ex.depth))) for e, ex in experts.items()}
    num_steps = max(max(s) + 1 for s in steps_of.values())
    rates = linear_rates(drop_path, num_steps)
    for name, spec in expert_specs.items():
        adapters = spec.get("adapters")
        if adapters:
            adapters = {} if adapters is True else dict(adapters)
            check_keys(f"experts.{name}.adapters", adapters, ADAPTER_KEYS, "adapters")
            _build(f"experts.{name}.adapters", attach_adapters, expert=experts[name],
                   drop_path=[rates[s] for s in steps_of[name]], **adapters)
    operators = []
    for name, spec in (cfg.get("fusion") or {}).items():
        if spec is None:  # removed by an override (fusion.bca=null)
            continue
        path = f"fusion.{name}"
        cls = _section_class(path, spec, FUSIONS)
        options = _check_options(path, spec, cls, OPERATOR_KEYS, GRAPH_GIVEN)
        joined = list(spec.get("experts") or experts)
        operators.append(OperatorSpec(name, cls, joined, _steps(path, spec.get("steps"), num_steps),
                                      spec.get("site"), options))
    heads = {}
    for name, spec in (cfg.get("heads") or {}).items():
        if spec is None:
            continue
        path = f"heads.{name}"
        cls = _section_class(path, spec, HEADS)
        options = _check_options(path, spec, cls, HEAD_KEYS, ("dims", "name"))
        heads[name] = _build(path, cls, dims={e: ex.feature_dim for e, ex in experts.items()}, name=name, **options)
        heads[name].target = spec.get("target") or name
    model = _build("fusion", FusionModel, experts=experts, operators=operators, heads=heads, input_shapes=inputs,
                   align=align, drop_path=drop_path)
    trainable = dict(cfg.get("trainable") or {})
    check_keys("trainable", trainable, TRAINABLE_KEYS, "trainable")
    _build("trainable", TrainablePolicy(**{k: tuple(v or ()) for k, v in trainable.items()}).apply, model=model)
    model.recipe = dict(cfg)
    return model


def build(recipe: str | os.PathLike[str] | Mapping[str, Any], overrides: Iterable[str] = ()) -> nn.Module:
    """Build a model from a recipe (file path, name on the recipe search path such as ``cast`` or
    ``binding/bca``: :func:`list_recipes`, or a mapping) and dotlist overrides.

    Returns a :class:`~fusionkit.graph.FusionModel`; ``model(batch)`` maps a dict of modality tensors
    (``video`` ``(B, 3, T, H, W)``, ``audio`` ``(B, samples)``) to ``{head name: logits}``.
    """
    return build_from_config(load_recipe(recipe, overrides))

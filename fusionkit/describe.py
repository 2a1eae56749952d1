"""``describe``: parameters, forward GFLOPs per view and the expert graph of a model or recipe.

:func:`describe` returns a plain dict (JSON-serialisable):

* ``params_total`` / ``params_trainable`` and ``params``: ``{"experts" | "operators" | "heads" [| "other"]:
  {name: {"total", "trainable"}}}``; a parameter shared by several modules is counted once (under
  the first name ``named_parameters`` gives it).
* ``gflops``: forward GFLOPs of one view (one sample of ``model.input_shapes``) in the convention of
  the video papers (VideoMAE, CAST, ...): **one multiply-add = one FLOP**, i.e. torch's count / 2;
  ``gflops_torch``: torch's own count (a multiply-add is two FLOPs); ``flops_convention`` says so.
  Counted with :class:`torch.utils.flop_counter.FlopCounterMode` (matrix products and convolutions;
  norms, softmax and element-wise ops are not counted, as in the papers). Attention computed by
  ``F.scaled_dot_product_attention`` is counted too: on CPU it runs as
  ``aten._scaled_dot_product_flash_attention_for_cpu``, which torch has no formula for; this
  module adds the same formula torch uses for the CUDA kernels (two batched matmuls).
* ``flops_breakdown``: GFLOPs (paper convention) per expert, per operator and per head, from the
  module hierarchy that FlopCounterMode records, plus ``unattributed`` (ops run outside any
  sub-module of those, if any).
* ``flops_device``: ``"meta"`` when the count ran on the meta device (no weights, no arithmetic:
  fast), ``"cpu"`` when it fell back to a real batch-1 forward under ``torch.no_grad`` (``flops_note``
  says why).
* ``graph``: :meth:`FusionModel.graph_summary` rows (operator, type, experts, steps, site).

For a recipe (path, name or mapping) the model is built on the meta device; a model given as a
module is copied onto the meta device (its parameters are not touched or copied).

:func:`render` turns the dict into rich tables; :func:`add_command` adds ``fusionkit describe RECIPE
[overrides ...] [--json]`` to an argparse sub-parser set.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

CONVENTION = ("multiply-add = 1 FLOP (video papers' convention: torch's FlopCounterMode count / 2); "
              "gflops_torch counts a multiply-add as 2 FLOPs")
GROUPS = (("experts", "experts"), ("operators", "fusions"), ("heads", "heads"))

aten = torch.ops.aten


# FLOP formulas torch lacks --------------------------------------------------------------------------

def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    """``F.scaled_dot_product_attention`` on CPU (torch counts the CUDA kernels only)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict[Any, Any]:
    ops = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        op = getattr(aten, name, None)
        if op is not None:
            ops[op] = _sdpa_cpu_flop
    return ops


def flop_counter() -> FlopCounterMode:
    """A silent :class:`FlopCounterMode` that also counts SDPA on CPU."""
    return FlopCounterMode(display=False, custom_mapping=_extra_formulas())


# the meta device ------------------------------------------------------------------------------------

class MetaMode(TorchFunctionMode):
    """Parameters and activations on the meta device, everything else (index bookkeeping) on CPU.

    With ``build=True`` every parameter a module registers is replaced by a meta parameter of the
    same shape, dtype and ``requires_grad`` (factories are not redirected: fusionkit computes window
    plans, token intervals and layouts from tensor values, and caches some of them), and
    ``Tensor.to`` of a meta tensor to another device stays on meta (open_clip moves what it builds to
    CPU). Any op that mixes meta tensors with CPU tensors (the probe's zero sample, a position table,
    a window index, a mask) gets the CPU ones moved to meta.
    """

    def __init__(self, build: bool = True) -> None:
        super().__init__()
        self.build = build
        self._saved: Any = None

    def __enter__(self) -> MetaMode:
        if self.build:
            self._saved = nn.Module.register_parameter

            def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
                if param is not None and not param.is_meta:
                    param = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
                self._saved(module, name, param)

            nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._saved is not None:
            nn.Module.register_parameter = self._saved  # type: ignore[method-assign]
            self._saved = None
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if self.build and func is torch.Tensor.to and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            if device is not None and device.type != "meta":
                return args[0].to(device="meta", dtype=dtype or args[0].dtype)
        flat = pytree.tree_leaves((args, kwargs))
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in flat) and \
                any(isinstance(t, torch.Tensor) and not t.is_meta and t.dim() > 0 for t in flat):
            def to_meta(t: Any) -> Any:
                return t.to("meta") if isinstance(t, torch.Tensor) and not t.is_meta and t.dim() > 0 else t
            args, kwargs = pytree.tree_map(to_meta, (args, kwargs))
        return func(*args, **kwargs)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are meta tensors (nothing is copied)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


# parameters ------------------------------------------------------------------------------------------

def count_params(model: nn.Module) -> dict[str, Any]:
    """``params_total``, ``params_trainable`` and ``params`` per expert / operator / head."""
    groups: dict[str, dict[str, dict[str, int]]] = {g: {} for g, _ in GROUPS}
    other = {"total": 0, "trainable": 0}
    seen: set[int] = set()
    attrs = {attr: g for g, attr in GROUPS}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        parts = name.split(".")
        if parts[0] in attrs and len(parts) > 2:
            row = groups[attrs[parts[0]]].setdefault(parts[1], {"total": 0, "trainable": 0})
        else:
            row = other
        row["total"] += p.numel()
        row["trainable"] += p.numel() if p.requires_grad else 0
    # experts / operators / heads without parameters still get a row
    for g, attr in GROUPS:
        for key in getattr(model, attr, {}) or {}:
            groups[g].setdefault(key, {"total": 0, "trainable": 0})
    params: dict[str, Any] = dict(groups)
    if other["total"]:
        params["other"] = {"other": other}
    total = sum(r["total"] for g in params.values() for r in g.values())
    trainable = sum(r["trainable"] for g in params.values() for r in g.values())
    return {"params_total": total, "params_trainable": trainable, "params": params}


# FLOPs -----------------------------------------------------------------------------------------------

def _sample(model: nn.Module, device: str | torch.device) -> dict[str, torch.Tensor]:
    shapes = getattr(model, "input_shapes", None)
    if not shapes:
        raise ValueError("describe needs model.input_shapes (one sample's shape per modality)")
    return {k: torch.zeros(1, *v, device=device) for k, v in shapes.items()}


def count_flops(model: nn.Module, device: str | torch.device = "meta") -> dict[str, Any]:
    """Torch's FLOP count of one batch-1 forward: ``{"total": int, "modules": {fqn: int}}``.

    ``device="meta"`` expects a meta model (see :func:`meta_copy`); otherwise the model runs for real
    on its own device."""
    was_training = model.training
    model.eval()
    counter = flop_counter()
    try:
        with torch.no_grad():
            if str(device) == "meta":
                batch = _sample(model, "meta")
                with MetaMode(build=False), counter:
                    model(batch)
            else:
                batch = _sample(model, device)
                with counter:
                    model(batch)
    finally:
        model.train(was_training)
    modules = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    return {"total": counter.get_total_flops(), "modules": modules}


def _breakdown(model: nn.Module, counts: Mapping[str, int], total: int) -> dict[str, Any]:
    """Paper-convention GFLOPs per expert / operator / head from FlopCounterMode's module keys."""
    root = type(model).__name__
    out: dict[str, Any] = {}
    attributed = 0
    for g, attr in GROUPS:
        out[g] = {}
        for name in getattr(model, attr, {}) or {}:
            prefix = f"{root}.{attr}.{name}"
            keys = [k for k in counts if k == prefix or k.startswith(prefix + ".")]
            # outermost tracked modules only (an entry includes its children's FLOPs)
            top = [k for k in keys if not any(k != a and k.startswith(a + ".") for a in keys)]
            flops = sum(counts[k] for k in top)
            attributed += flops
            out[g][name] = flops / 2e9
    out["unattributed"] = max(total - attributed, 0) / 2e9
    return out


# describe --------------------------------------------------------------------------------------------

def _build_meta(recipe: Any, overrides: Iterable[str]) -> nn.Module:
    from fusionkit.recipes import build

    with MetaMode(build=True):
        return build(recipe, overrides)


def describe(model_or_recipe: Any, overrides: Iterable[str] = (), device: str = "meta") -> dict[str, Any]:
    """Parameters, forward GFLOPs per view and the expert graph (see the module docstring).

    Args:
        model_or_recipe: a built model (``FusionModel``) or a recipe (path, name in ``recipes/``,
            mapping) that is built here.
        overrides: dotlist overrides for a recipe (``fusion.bca.ratio=0.25``).
        device: ``"meta"`` (default: count shapes only, fast) or a real device (``"cpu"``) to count
            a real batch-1 forward.
    """
    from fusionkit.recipes import build

    overrides = list(overrides)
    is_model = isinstance(model_or_recipe, nn.Module)
    if is_model and overrides:
        raise ValueError("describe: overrides apply to a recipe, not to a built model")
    note = None
    model = None
    if str(device) == "meta":
        try:
            model = meta_copy(model_or_recipe) if is_model else _build_meta(model_or_recipe, overrides)
            flops = count_flops(model, "meta")
            used = "meta"
        except Exception as err:  # noqa: BLE001 - fall back to a real forward
            from fusionkit.recipes import RecipeError

            if isinstance(err, RecipeError):
                raise
            note = f"meta-device count failed ({type(err).__name__}: {err}); counted a real batch-1 forward"
            model = None
    if model is None or note is not None:
        model = model_or_recipe if is_model else build(model_or_recipe, overrides)
        real = "cpu" if str(device) == "meta" else device
        if not is_model:
            model = model.to(real)
        else:
            real = next(iter(model.parameters()), torch.empty(0)).device
        flops = count_flops(model, real)
        used = str(torch.device(real).type)

    info: dict[str, Any] = {}
    recipe = getattr(model, "recipe", None) or {}
    info["name"] = recipe.get("name") or (str(model_or_recipe) if isinstance(model_or_recipe, (str, os.PathLike))
                                          else type(model).__name__)
    info["input_shapes"] = {k: list(v) for k, v in getattr(model, "input_shapes", {}).items()}
    info.update(count_params(model))
    info["gflops"] = flops["total"] / 2e9
    info["gflops_torch"] = flops["total"] / 1e9
    info["flops_convention"] = CONVENTION
    info["flops_per"] = "view (one sample of input_shapes, batch 1)"
    info["flops_device"] = used
    if note:
        info["flops_note"] = note
    info["flops_breakdown"] = _breakdown(model, flops["modules"], flops["total"])
    if hasattr(model, "cacheable_steps"):  # in training mode, as a training step runs
        was = model.training
        model.train(True)
        info["cacheable_steps"] = {"of": model.num_steps, **model.cacheable_steps()}
        model.train(was)
    info["graph"] = [dict(r, experts=list(r["experts"]), steps=list(r["steps"]))
                     for r in (model.graph_summary() if hasattr(model, "graph_summary") else [])]
    return info


# rendering -------------------------------------------------------------------------------------------

def _steps_text(steps: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``0-2, 5``."""
    runs: list[list[int]] = []
    for s in sorted(steps):
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "-"


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}" if n >= 1e5 or n == 0 else f"{n / 1e6:.4f}"


def _gf(g: float) -> str:
    return f"{g:.2f}" if g >= 1 or g == 0 else f"{g:.3g}"


def render(info: Mapping[str, Any]) -> Any:
    """Rich renderable: parameter table, GFLOPs per view (with the convention), graph table."""
    from rich.console import Group
    from rich.table import Table

    name = info.get("name", "model")
    params = Table(title=f"{name}: parameters (millions)", title_justify="left")
    for col, justify in (("kind", "left"), ("module", "left"), ("total", "right"), ("trainable", "right"),
                         ("%", "right")):
        params.add_column(col, justify=justify)
    breakdown = info.get("flops_breakdown", {})
    for group, rows in info["params"].items():
        for mod, r in rows.items():
            pct = f"{100 * r['trainable'] / r['total']:.1f}" if r["total"] else "-"
            params.add_row(group.rstrip("s"), mod, _millions(r["total"]), _millions(r["trainable"]), pct)
    pct = f"{100 * info['params_trainable'] / info['params_total']:.1f}" if info["params_total"] else "-"
    params.add_row("total", "", _millions(info["params_total"]), _millions(info["params_trainable"]), pct,
                   style="bold")

    shapes = ", ".join(f"{k} {tuple(v)}" for k, v in info.get("input_shapes", {}).items())
    flops = Table(title=f"forward GFLOPs per view ({shapes}, batch 1; counted on {info.get('flops_device')})",
                  title_justify="left",
                  caption="GFLOPs: 1 multiply-add = 1 FLOP (video papers' convention, torch's count / 2); "
                          "torch GFLOPs: 1 multiply-add = 2 FLOPs" + (f"\n{info['flops_note']}"
                                                                       if info.get("flops_note") else ""),
                  caption_justify="left")
    for col, justify in (("kind", "left"), ("module", "left"), ("GFLOPs", "right"), ("torch GFLOPs", "right")):
        flops.add_column(col, justify=justify)
    for group in ("experts", "operators", "heads"):
        for mod, g in breakdown.get(group, {}).items():
            flops.add_row(group.rstrip("s"), mod, _gf(g), _gf(2 * g))
    if breakdown.get("unattributed", 0) > 0:
        g = breakdown["unattributed"]
        flops.add_row("other", "(outside the modules above)", _gf(g), _gf(2 * g))
    flops.add_row("total", "", _gf(info["gflops"]), _gf(info["gflops_torch"]), style="bold")

    graph = Table(title="expert graph", title_justify="left")
    for col in ("operator", "type", "experts", "steps", "site"):
        graph.add_column(col)
    for r in info.get("graph", []):
        graph.add_row(r["operator"], r["type"], " ↔ ".join(r["experts"]), _steps_text(r["steps"]), str(r["site"]))
    if not info.get("graph"):
        graph.add_row("-", "-", "(no fusion operators)", "-", "-")
    return Group(params, flops, graph)


# command line ----------------------------------------------------------------------------------------

def cmd_describe(args: argparse.Namespace) -> int:
    import fusionkit  # noqa: F401 - registers the built-ins

    info = describe(args.recipe, args.overrides)
    if args.json:
        print(json.dumps(info))
        return 0
    from rich.console import Console

    Console().print(render(info))
    return 0


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``describe RECIPE [overrides ...] [--json]`` to an ``add_subparsers()`` object."""
    p = subparsers.add_parser("describe", help="parameters, GFLOPs per view and the expert graph of a recipe",
                              description="Parameters (total / trainable) per expert, operator and head, forward "
                                          "GFLOPs per view (1 multiply-add = 1 FLOP) and the expert graph.")
    p.add_argument("recipe", help="recipe file or name in recipes/ (e.g. cast)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. fusion.bca.ratio=0.25")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=cmd_describe)
    return p

"""The fusion graph: experts run layer by layer in lockstep, operators act at named sites.

``FusionModel`` holds three ``ModuleDict``s, which also name every parameter:

* ``experts.<name>``: the frozen experts (with their adapters);
* ``fusions.<name>.<step>``: one operator instance per step of each operator's layer range;
* ``heads.<name>``: heads reading pooled expert features.

Experts of different depth or kind are aligned by an explicit map: ``align[e][i]`` is the graph
step at which layer ``i`` of expert ``e`` runs (default: step ``i``). ResNet-50's four stages can
run at steps 2, 5, 8, 11 beside a 12-layer ViT. At each step::

    replace_attn operators   (they run the attention of the experts they cover)
    attention step of every other active transformer expert / whole stage of a CNN expert
    post_attn operators
    MLP step of every active transformer expert
    post_mlp operators

``model(batch)`` takes a dict of modality tensors (``video`` ``(B, 3, T, H, W)``, ``audio``
``(B, samples)``, ...) and returns ``{head name: logits}``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from fusionkit import feature_cache as fc
from fusionkit.attention import TokenLayout, attention_label, fused_kernel_ops
from fusionkit.experts.base import Expert, Tokens
from fusionkit.experts.layer import StepLayer, check_layers
from fusionkit.fusion.base import SITES, FusionOp, SiteState


@dataclass
class OperatorSpec:
    """An operator of the graph: registered class, joined experts, site, steps and options."""

    name: str
    cls: type[FusionOp]
    experts: Sequence[str]
    steps: Sequence[int]
    site: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


def linear_rates(rate: float, num: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 to ``rate`` over ``num`` steps."""
    return torch.linspace(0, rate, num).tolist() if num > 1 else [0.0] * num


class FusionModel(nn.Module):
    """Experts + fusion operators at sites + heads (see the module docstring).

    Args:
        experts: the experts by name.
        operators: operator specifications (built here, one instance per step).
        heads: heads by name (built by the caller; each declares the experts it reads in ``inputs``).
        input_shapes: one sample's shape per modality (e.g. ``{"video": (3, 16, 224, 224)}``): the
            graph probes the experts once with zeros of these shapes to learn every step's layout,
            which sizes the operators (e.g. B-CA position embeddings per window).
        align: layer → step maps per expert (default: layer ``i`` at step ``i``).
        drop_path: stochastic depth of operators, rising linearly over the steps.
    """

    def __init__(self, experts: Mapping[str, Expert], operators: Sequence[OperatorSpec],
                 heads: Mapping[str, nn.Module], input_shapes: Mapping[str, Sequence[int]],
                 align: Mapping[str, Sequence[int]] | None = None, drop_path: float = 0.0) -> None:
        super().__init__()
        self.experts = nn.ModuleDict(dict(experts))
        for e, expert in experts.items():
            check_layers(e, expert.layers)
        self.align = {e: list(range(ex.depth)) for e, ex in experts.items()}
        for e, steps in (align or {}).items():
            self._check_align(e, list(steps))
            self.align[e] = list(steps)
        self.num_steps = max(max(s) + 1 for s in self.align.values() if s)
        self._active_at = [self._active(step) for step in range(self.num_steps)]  # step -> {expert: layer}
        self.input_shapes = {k: tuple(v) for k, v in input_shapes.items()}
        dims, layouts = self._probe()
        rates = linear_rates(drop_path, self.num_steps)
        self.fusions = nn.ModuleDict()
        self._schedule: dict[int, dict[str, list[FusionOp]]] = {s: {site: [] for site in SITES}
                                                                 for s in range(self.num_steps)}
        self._op_labels: dict[int, str] = {}
        for spec in operators:
            self._add_operator(spec, dims, layouts, rates)
        self.heads = nn.ModuleDict(dict(heads))
        self.recompute: bool | str = False  # train.recompute_experts (_expert_step): False, True, "keep_attention"
        self._cache_plans: dict[tuple[bool, ...], dict[str, tuple[int, str]]] = {}
        self.register_load_state_dict_post_hook(lambda module, keys: module._cache_plans.clear())
        for name, head in self.heads.items():
            missing = [e for e in getattr(head, "inputs", {}) if e not in self.experts]
            if missing:
                raise ValueError(f"head {name!r} reads unknown expert(s) {missing}; experts: {list(self.experts)}")

    # construction ------------------------------------------------------------------------------

    def _check_align(self, name: str, steps: list[int]) -> None:
        if name not in self.experts:
            raise ValueError(f"align names unknown expert {name!r}; experts: {list(self.experts)}")
        depth = self.experts[name].depth
        if len(steps) != depth or any(b <= a for a, b in zip(steps, steps[1:])) or min(steps, default=0) < 0:
            raise ValueError(f"align.{name} must list {depth} increasing non-negative steps (one per layer), "
                             f"got {steps}")

    def _active(self, step: int) -> dict[str, int]:
        """Experts with a layer at ``step``: name → layer index."""
        return {e: steps.index(step) for e, steps in self.align.items() if step in steps}

    @torch.no_grad()
    def _probe(self) -> tuple[list[dict[str, int]], list[dict[str, TokenLayout]]]:
        """Width and layout of every expert after every step, from one zero sample per modality
        (in eval mode, so that no BatchNorm statistic moves)."""
        modes = {e: expert.training for e, expert in self.experts.items()}
        self.experts.eval()
        tokens = {}
        for e, expert in self.experts.items():
            if expert.modality not in self.input_shapes:
                raise ValueError(f"expert {e!r} reads modality {expert.modality!r} but the recipe's inputs give "
                                 f"only {sorted(self.input_shapes)}: a new modality needs an entry "
                                 f"inputs.{expert.modality} (one sample's shape) and a data set whose items "
                                 f"carry {expert.modality!r}")
            tokens[e] = expert.embed(torch.zeros(1, *self.input_shapes[expert.modality]))
        dims, layouts = [], []
        for step in range(self.num_steps):
            for e, i in self._active_at[step].items():
                layer = self.experts[e].layers[i]
                if not isinstance(layer, StepLayer):  # a stage changes the grid and the width
                    tokens[e] = Tokens(*layer(tokens[e].x, tokens[e].layout))
            dims.append({e: t.x.shape[-1] for e, t in tokens.items()})
            layouts.append({e: t.layout for e, t in tokens.items()})
        for e, mode in modes.items():
            self.experts[e].train(mode)
        return dims, layouts

    def _add_operator(self, spec: OperatorSpec, dims: list[dict[str, int]],
                      layouts: list[dict[str, TokenLayout]], rates: list[float]) -> None:
        unknown = [e for e in spec.experts if e not in self.experts]
        if unknown:
            raise ValueError(f"operator {spec.name!r} joins unknown expert(s) {unknown}; experts: {list(self.experts)}")
        if spec.cls.sites and spec.site:
            raise ValueError(f"operator {spec.name!r}: {spec.cls.__name__} acts at the sites {spec.cls.sites}; "
                             "its site cannot be set")
        sites = spec.cls.sites or (spec.site or spec.cls.site,)
        for site in sites:
            if site not in SITES:
                raise ValueError(f"operator {spec.name!r}: unknown site {site!r}; valid sites: {', '.join(SITES)}")
        ops = nn.ModuleDict()
        for step in spec.steps:
            if not 0 <= step < self.num_steps:
                raise ValueError(f"operator {spec.name!r}: step {step} is outside the graph's "
                                 f"{self.num_steps} steps (0-{self.num_steps - 1})")
            try:
                op = spec.cls(experts=list(spec.experts), dims={e: dims[step][e] for e in spec.experts},
                              layouts={e: layouts[step][e] for e in spec.experts},
                              drop_path=rates[step], **dict(spec.options))
            except (ValueError, TypeError, KeyError) as err:
                raise ValueError(f"operator {spec.name!r} ({spec.cls.__name__}) at step {step}: {err}") from err
            ops[str(step)] = op
            for site in sites:
                self._schedule[step][site].append(op)
            self._op_labels[id(op)] = f"{spec.name}/{step}"  # names its attention calls (attention.recording)
        self.fusions[spec.name] = ops

    # running -----------------------------------------------------------------------------------

    def embed(self, batch: Mapping[str, Tensor]) -> dict[str, Tokens]:
        out = {}
        for e, expert in self.experts.items():
            if expert.modality not in batch:
                raise KeyError(f"expert {e!r} needs batch[{expert.modality!r}]; the batch has {sorted(batch)}")
            out[e] = expert.embed(batch[expert.modality])
        return out

    def _run_site(self, site: str, ops: list[FusionOp], x: dict[str, Tensor], layouts: dict[str, TokenLayout],
                  layers: dict[str, nn.Module], step: int, carry: dict[int, dict[str, Any]]) -> None:
        for op in ops:
            with attention_label(self._op_labels.get(id(op), type(op).__name__)):
                x.update(op(SiteState(x, layouts, layers, step, site, carry.setdefault(id(op), {}))))

    # frozen-feature cache (fusionkit.feature_cache) ----------------------------------------------

    def cacheable_steps(self) -> dict[str, int]:
        """Per expert: how many leading steps compute its tokens from its own input with fixed
        weights (no operator joins it there, no trainable or stochastic module in its embedding
        or those layers): the steps a frozen-feature cache may skip."""
        joined: dict[str, int] = {}
        for step in range(self.num_steps):
            for ops in self._schedule[step].values():
                for e in (e for op in ops for e in op.experts):
                    joined.setdefault(e, step)
        out = {}
        for e, expert in self.experts.items():
            layers = list(expert.layers)
            after = [getattr(expert, n, None) for n in ("final_norm", "pool_norm")]
            skip = {id(m) for m in [*layers, *after] if isinstance(m, nn.Module)}
            steps = 0
            if fc.is_fixed(fc.borrowed(expert), skip):
                for step in range(joined.get(e, self.num_steps)):
                    i = self._active_at[step].get(e)
                    if i is not None and not fc.is_fixed([layers[i]]):
                        break
                    steps = step + 1
            out[e] = steps
        return out

    def _cache_plan(self) -> dict[str, tuple[int, str]]:
        """``{expert: (cacheable steps, fingerprint)}``, recomputed when the trainable set or mode changes."""
        key = (self.training, *(p.requires_grad for p in self.parameters()))
        if key not in self._cache_plans:
            steps = self.cacheable_steps()
            self._cache_plans[key] = {e: (n, fc.fingerprint(self.experts[e]) if n else "") for e, n in steps.items()}
        return self._cache_plans[key]

    def _run_alone(self, e: str, tokens: Tokens, steps: int) -> Tokens:
        """Expert ``e``'s layers of the first ``steps`` steps, without operators."""
        x, layout = tokens.x, tokens.layout
        for step in range(steps):
            i = self._active_at[step].get(e)
            if i is None:
                continue
            layer = self.experts[e].layers[i]
            if isinstance(layer, StepLayer):
                x = layer(x, layout)
            else:
                x, layout = layer(x, layout)
        return Tokens(x, layout)

    def start(self, batch: Mapping[str, Tensor]) -> tuple[dict[str, Tokens], dict[str, int]]:
        """Every expert's tokens at the step it starts from: embedded (step 0), or, inside
        ``fusionkit.feature_cache.enabled``, after its cacheable steps, from the cache or computed
        alone and stored. Returns (tokens, first step to run per expert)."""
        cache = fc.active()
        if cache is None:
            return self.embed(batch), {e: 0 for e in self.experts}
        tokens, begin = {}, {}
        for e, (steps, owner) in self._cache_plan().items():
            expert = self.experts[e]
            if expert.modality not in batch:
                raise KeyError(f"expert {e!r} needs batch[{expert.modality!r}]; the batch has {sorted(batch)}")
            inputs = batch[expert.modality]
            begin[e] = steps
            if not steps:
                tokens[e] = expert.embed(inputs)
                continue
            kind = inputs.device.type
            precision = f":{torch.is_autocast_enabled(kind)}:{torch.get_autocast_dtype(kind)}"
            keys = fc.digests(inputs)
            hit = cache.get(owner + precision, steps, keys)
            if hit is not None:
                tokens[e] = Tokens(hit[0].to(inputs.device), hit[1])
                continue
            with torch.no_grad():
                tokens[e] = self._run_alone(e, expert.embed(inputs), steps)
            cache.put(owner + precision, steps, keys, tokens[e].x, tokens[e].layout)
        return tokens, begin

    def forward_tokens(self, batch: Mapping[str, Tensor]) -> dict[str, Tokens]:
        """Final tokens of every expert (after ``final_norm``) with all operators applied."""
        tokens, begin = self.start(batch)
        x = {e: t.x for e, t in tokens.items()}
        layouts = {e: t.layout for e, t in tokens.items()}
        for step in range(self.num_steps):
            sites = self._schedule[step]
            layers = {e: self.experts[e].layers[i] for e, i in self._active_at[step].items() if step >= begin[e]}
            handled = {e for op in sites["replace_attn"] for e in op.experts}
            carry: dict[int, dict[str, Any]] = {}  # per operator, from one site of this step to the next
            self._run_site("replace_attn", sites["replace_attn"], x, layouts, layers, step, carry)
            for e, layer in layers.items():
                if e in handled:
                    continue
                if isinstance(layer, StepLayer):
                    x[e] = self._expert_step(layer.attend, x[e], layouts[e])
                else:
                    x[e], layouts[e] = self._expert_step(layer, x[e], layouts[e])
            self._run_site("post_attn", sites["post_attn"], x, layouts, layers, step, carry)
            for e, layer in layers.items():
                if isinstance(layer, StepLayer):
                    x[e] = self._expert_step(layer.feed_forward, x[e])
            self._run_site("post_mlp", sites["post_mlp"], x, layouts, layers, step, carry)
        return {e: Tokens(self.experts[e].final_norm(x[e]), layouts[e]) for e in x}

    def _expert_step(self, fn: Any, *args: Any) -> Any:
        """An expert's step; with ``recompute`` in training, through activation checkpointing: its
        activations are dropped after the forward and recomputed in the backward (drop-path draws
        replayed), trading part of one more forward of the experts for their activation memory:
        ``True`` keeps only the step's input; ``"keep_attention"`` also what the fused attention kernels
        return (:func:`~fusionkit.attention.fused_kernel_ops`, the dearest to recompute per byte kept)."""
        if self.recompute and self.training and torch.is_grad_enabled():
            keep = _KEEP_ATTENTION if self.recompute == "keep_attention" else {}
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **keep)
        return fn(*args)

    def features(self, tokens: Mapping[str, Tokens]) -> dict[tuple[str, str | None], Tensor]:
        """Pooled features ``(B, D_e)`` for every (expert, pool mode) that a head reads."""
        feats: dict[tuple[str, str | None], Tensor] = {}
        for head in self.heads.values():
            for e, mode in head.inputs.items():
                if (e, mode) not in feats:
                    feats[(e, mode)] = self.experts[e].pool(tokens[e], mode)
        return feats

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{head name: logits}`` for a batch of modality tensors."""
        feats = self.features(self.forward_tokens(batch))
        return {name: head({e: feats[(e, mode)] for e, mode in head.inputs.items()})
                for name, head in self.heads.items()}

    def graph_summary(self) -> list[dict[str, Any]]:
        """Which operator joins which experts at which steps and site (for ``describe``)."""
        rows = []
        for name, ops in self.fusions.items():
            first = next(iter(ops.values()), None)
            site = "+".join(s for s in SITES if first is not None and
                            any(o is first for o in self._schedule[int(next(iter(ops)))][s])) or None
            rows.append({"operator": name, "type": type(first).__name__ if first is not None else "-",
                         "experts": list(first.experts) if first is not None else [],
                         "steps": [int(s) for s in ops], "site": site})
        return rows


def _attention_kept(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective checkpointing policy: save what the fused attention kernels return, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in fused_kernel_ops() else CheckpointPolicy.PREFER_RECOMPUTE


# checkpoint() keyword arguments of `train.recompute_experts: keep_attention`; where torch has the option (2.14),
# the outputs it keeps pass through the saved-tensor hooks around the step (save_on_cpu, memory accounting), as
# autograd's own saved tensors do
_KEEP_ATTENTION = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _attention_kept)}
if "respect_saved_tensors_hooks" in inspect.signature(torch.utils.checkpoint.checkpoint).parameters:
    _KEEP_ATTENTION["respect_saved_tensors_hooks"] = True

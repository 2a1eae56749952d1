"""Classification heads: pooled expert features in, logits out, and the loss that goes with them.

A head declares which experts it reads and how each one is pooled (``Head.inputs``); the fusion
graph pools every listed expert's final tokens (``Expert.pool(tokens, mode)``) and calls
``head(feats)`` with ``feats[name]`` of shape ``(B, D_name)``. The head returns logits
``(B, num_classes)`` and computes its own loss (``Head.loss``), so a model with several heads
(EK100: verb and noun) sums them with :func:`total_loss`.

Built-ins (constructors take keyword arguments only; ``dims`` maps expert name → feature width
and is filled in by the graph, the rest comes from the recipe):

* ``linear``: ``Linear(D, classes)`` on one expert (CAST EK100 ``head_verb`` / ``head_noun``);
* ``adapter_sum``: CAST's single head, ``Linear(Σ_e ADAP_e(feat_e))`` (CAST §3);
* ``concat``: late fusion by concatenation, ``Linear(concat_e feat_e)``;
* ``sum``: late fusion at the logit level, ``Σ_e Linear_e(feat_e)``;
* ``mlp``: ``Linear → act → dropout → Linear`` on the concatenated features (LAVISH, AV-STFP).

Initialisation follows CAST's official code: every ``Linear`` weight ``trunc_normal(std=0.02)``,
biases zero, then the classifier's weight and bias multiplied by ``init_scale`` (CAST fine-tuning
uses 0.001); adapters as :class:`~fusionkit.adapters.Adapter` (up-projection zero).

Label smoothing is applied by the head to every single-label target, class ids and soft
targets alike (``F.cross_entropy`` semantics). Mixup must therefore hand over *unsmoothed*
mixed one-hot targets: smoothing and mixing commute, so the result equals timm's
smooth-then-mix targets with ``SoftTargetCrossEntropy``, and smoothing is never applied twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionkit.adapters import Adapter
from fusionkit.registry import HEADS

PoolSpec = str | None | Mapping[str, str | None]


def _init_linear(fc: nn.Linear, scale: float = 1.0, std: float = 0.02) -> nn.Linear:
    """CAST init: ``trunc_normal(std)`` weight, zero bias, both times ``scale``."""
    nn.init.trunc_normal_(fc.weight, std=std)
    nn.init.zeros_(fc.bias)
    if scale != 1.0:
        with torch.no_grad():
            fc.weight.mul_(scale)
            fc.bias.mul_(scale)
    return fc


class Head(nn.Module):
    """Base class of every head: pooled features of some experts → logits ``(B, num_classes)``.

    Attributes:
        inputs: expert name → pool mode the graph must use for that expert's feature
            (``None``: the expert's default). Ordered: concatenating heads follow this order.
        dims: expert name → feature width, for the experts in ``inputs``.
        num_classes: number of logits.
        multilabel: BCE-with-logits loss on ``(B, classes)`` float targets instead of cross-entropy.
        label_smoothing: ε of the loss (see :meth:`loss`).
        name: instance name used in error messages (the graph's head key, e.g. ``"verb"``);
            ``None`` until set.
        kind: registry name of the head class.
    """

    kind: str = "head"

    def __init__(self, *, dims: Mapping[str, int], experts: Sequence[str], classes: int,
                 pool: PoolSpec = None, multilabel: bool = False, label_smoothing: float = 0.0,
                 name: str | None = None) -> None:
        super().__init__()
        self.name = name
        if isinstance(experts, str):
            experts = [experts]
        experts = list(experts)
        if not experts:
            raise ValueError(f"{self.label}: needs at least one expert")
        if len(set(experts)) != len(experts):
            raise ValueError(f"{self.label}: experts listed twice in {experts}")
        missing = [e for e in experts if e not in dims]
        if missing:
            raise KeyError(f"{self.label}: no feature width for expert(s) {missing}; "
                           f"the model's experts are {sorted(dims)}")
        for e in experts:
            if "." in e or not e:
                raise ValueError(f"{self.label}: expert name {e!r} cannot name a sub-module (empty or contains '.')")
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
            raise ValueError(f"{self.label}: classes must be a positive int, got {classes!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"{self.label}: label_smoothing must be in [0, 1), got {label_smoothing}")
        if isinstance(pool, Mapping):
            unknown = sorted(set(pool) - set(experts))
            if unknown:
                raise KeyError(f"{self.label}: pool modes given for experts {unknown} the head does not read "
                               f"(it reads {experts})")
            pools = {e: pool.get(e) for e in experts}
        else:
            pools = {e: pool for e in experts}
        self.inputs: dict[str, str | None] = pools
        self.dims: dict[str, int] = {e: int(dims[e]) for e in experts}
        self.num_classes = classes
        self.multilabel = bool(multilabel)
        self.label_smoothing = float(label_smoothing)

    @property
    def label(self) -> str:
        """How error messages name this head."""
        return f"head {self.name!r} ({self.kind})" if self.name else f"{self.kind} head"

    def extra_repr(self) -> str:
        return (f"inputs={self.inputs}, classes={self.num_classes}, multilabel={self.multilabel}, "
                f"label_smoothing={self.label_smoothing}")

    # -- inputs ---------------------------------------------------------------------------------

    def gather(self, feats: Mapping[str, Tensor]) -> list[Tensor]:
        """The features of ``inputs`` in order, each checked to be ``(B, D_e)`` with one ``B``."""
        out = []
        batch = None
        for e, dim in self.dims.items():
            if e not in feats:
                raise KeyError(f"{self.label}: no feature for expert {e!r}; got features of {sorted(feats)}")
            x = feats[e]
            if x.dim() != 2 or x.shape[1] != dim:
                raise ValueError(f"{self.label}: feature of expert {e!r} must be (B, {dim}), "
                                 f"got shape {tuple(x.shape)}")
            if batch is None:
                batch = x.shape[0]
            elif x.shape[0] != batch:
                raise ValueError(f"{self.label}: features disagree on batch size: expert {e!r} has "
                                 f"{x.shape[0]}, expected {batch} (shapes "
                                 f"{ {k: tuple(feats[k].shape) for k in self.dims if k in feats} })")
            out.append(x)
        return out

    def forward(self, feats: Mapping[str, Tensor]) -> Tensor:
        """Logits ``(B, num_classes)`` from ``feats[e]`` ``(B, D_e)`` for every ``e`` in ``inputs``."""
        raise NotImplementedError

    # -- loss -----------------------------------------------------------------------------------

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Scalar loss of ``logits`` ``(B, C)`` against ``target``.

        Single-label: cross-entropy with ``label_smoothing``; ``target`` is ``(B,)`` integer class
        ids or ``(B, C)`` float class probabilities (mixup; unsmoothed, the head smooths them).
        Multi-label: BCE-with-logits averaged over all ``B·C`` entries; ``target`` ``(B, C)``
        in ``[0, 1]`` (bool/int accepted); label smoothing moves it towards ``0.5``:
        ``t·(1−ε) + ε/2``.
        """
        return self._loss(logits, target, self.label)

    def _loss(self, logits: Tensor, target: Tensor, label: str) -> Tensor:
        c = self.num_classes
        if logits.dim() != 2 or logits.shape[1] != c:
            raise ValueError(f"{label}: logits must be (B, {c}), got shape {tuple(logits.shape)}")
        b = logits.shape[0]
        if self.multilabel:
            if tuple(target.shape) != (b, c):
                raise ValueError(f"{label}: multi-label target must be (B, classes) = ({b}, {c}) float, "
                                 f"got shape {tuple(target.shape)}")
            target = target.to(logits.dtype)
            if self.label_smoothing:
                target = target * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
            return F.binary_cross_entropy_with_logits(logits, target)
        if target.dim() == 1:
            if target.shape[0] != b:
                raise ValueError(f"{label}: target must be (B,) = ({b},) class ids or (B, classes) = ({b}, {c}) "
                                 f"probabilities, got shape {tuple(target.shape)}")
            if target.dtype.is_floating_point or target.dtype == torch.bool:
                raise ValueError(f"{label}: class-id target must be an integer tensor, got {target.dtype}")
            if b and (int(target.min()) < 0 or int(target.max()) >= c):
                raise ValueError(f"{label}: class ids must lie in [0, {c}), got range "
                                 f"[{int(target.min())}, {int(target.max())}]")
            return F.cross_entropy(logits, target.long(), label_smoothing=self.label_smoothing)
        if tuple(target.shape) != (b, c):
            raise ValueError(f"{label}: target must be (B,) = ({b},) class ids or (B, classes) = ({b}, {c}) "
                             f"probabilities, got shape {tuple(target.shape)}")
        if not target.dtype.is_floating_point:
            raise ValueError(f"{label}: soft target (B, classes) must be float, got {target.dtype}")
        return F.cross_entropy(logits, target.to(logits.dtype), label_smoothing=self.label_smoothing)


def _check_dropout(head: Head, p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{head.label}: dropout must be in [0, 1), got {p}")
    return float(p)


@HEADS.register("linear")
class LinearHead(Head):
    """Linear classifier on one expert's pooled feature (CAST EK100 head_verb / head_noun).

    ``dropout → Linear(D, classes)``; parameters ``fc.weight`` ``(classes, D)``, ``fc.bias``.

    Args:
        dims: expert name → feature width (from the graph).
        expert: the expert read.
        classes: number of classes.
        pool: pool mode for the expert (``None``: its default).
        dropout: dropout before the linear.
        init_scale: multiplies the initial weight and bias (CAST fine-tuning: 0.001).
        multilabel, label_smoothing: loss options (see :meth:`Head.loss`).
        name: instance name for error messages.
    """

    kind = "linear"

    def __init__(self, *, dims: Mapping[str, int], expert: str, classes: int, pool: str | None = None,
                 dropout: float = 0.0, init_scale: float = 1.0, multilabel: bool = False,
                 label_smoothing: float = 0.0, name: str | None = None) -> None:
        if not isinstance(expert, str):
            raise TypeError(f"linear head: expert must be one expert name, got {expert!r} (use concat/sum/mlp "
                            "for several)")
        super().__init__(dims=dims, experts=[expert], classes=classes, pool=pool, multilabel=multilabel,
                         label_smoothing=label_smoothing, name=name)
        self.expert = expert
        self.dropout = nn.Dropout(_check_dropout(self, dropout))
        self.fc = _init_linear(nn.Linear(self.dims[expert], classes), init_scale)

    def forward(self, feats: Mapping[str, Tensor]) -> Tensor:
        (x,) = self.gather(feats)
        return self.fc(self.dropout(x))


@HEADS.register("adapter_sum")
class AdapterSumHead(Head):
    """CAST single head: sum of per-expert adapters (no skip), dropout, Linear (CAST §3).

    ``Z = Σ_e ADAP_e(feat_e)``, logits ``= Linear(dropout(Z))``. Each adapter is
    ``Linear(D, D·ratio) → GELU → Linear(D·ratio, D)`` with the up-projection zero at init, so at
    init ``Z = 0`` and the logits equal the classifier bias. All experts must share one width.
    Parameters ``adapters.<expert>.D_fc1.*``, ``adapters.<expert>.D_fc2.*``, ``fc.*`` (official
    names: ``noun_last_Adapter`` = spatial, ``verb_last_Adapter`` = temporal, ``head``).

    Args:
        dims: expert name → feature width (from the graph).
        experts: experts read (CAST: spatial and temporal).
        classes: number of classes.
        ratio: adapter bottleneck width as a fraction of ``D``.
        pool: one pool mode for all experts, or expert → mode.
        dropout: dropout on ``Z`` before the linear.
        init_scale: multiplies the classifier's initial weight and bias.
        multilabel, label_smoothing, name: see :class:`Head`.
    """

    kind = "adapter_sum"

    def __init__(self, *, dims: Mapping[str, int], experts: Sequence[str], classes: int, ratio: float = 0.25,
                 pool: PoolSpec = None, dropout: float = 0.0, init_scale: float = 1.0, multilabel: bool = False,
                 label_smoothing: float = 0.0, name: str | None = None) -> None:
        super().__init__(dims=dims, experts=experts, classes=classes, pool=pool, multilabel=multilabel,
                         label_smoothing=label_smoothing, name=name)
        widths = set(self.dims.values())
        if len(widths) != 1:
            raise ValueError(f"{self.label}: adapter_sum adds the experts' features, so they need one width; got "
                             f"{self.dims} (use concat or mlp, or project the features first)")
        (dim,) = widths
        self.adapters = nn.ModuleDict({e: Adapter(dim, ratio) for e in self.dims})
        self.dropout = nn.Dropout(_check_dropout(self, dropout))
        self.fc = _init_linear(nn.Linear(dim, classes), init_scale)

    def forward(self, feats: Mapping[str, Tensor]) -> Tensor:
        xs = self.gather(feats)
        z = self.adapters[next(iter(self.dims))](xs[0])
        for e, x in zip(list(self.dims)[1:], xs[1:]):
            z = z + self.adapters[e](x)
        return self.fc(self.dropout(z))


@HEADS.register("concat")
class ConcatHead(Head):
    """Late fusion by concatenation: Linear on the concatenated expert features.

    ``dropout(concat_e feat_e) → Linear(Σ_e D_e, classes)``, features concatenated in the order of
    ``experts``. Parameters ``fc.*``.

    Args: ``dims``, ``experts``, ``classes``, ``pool`` (one mode or expert → mode), ``dropout``,
    ``init_scale``, ``multilabel``, ``label_smoothing``, ``name`` (as for ``adapter_sum``).
    """

    kind = "concat"

    def __init__(self, *, dims: Mapping[str, int], experts: Sequence[str], classes: int, pool: PoolSpec = None,
                 dropout: float = 0.0, init_scale: float = 1.0, multilabel: bool = False,
                 label_smoothing: float = 0.0, name: str | None = None) -> None:
        super().__init__(dims=dims, experts=experts, classes=classes, pool=pool, multilabel=multilabel,
                         label_smoothing=label_smoothing, name=name)
        self.dropout = nn.Dropout(_check_dropout(self, dropout))
        self.fc = _init_linear(nn.Linear(sum(self.dims.values()), classes), init_scale)

    def forward(self, feats: Mapping[str, Tensor]) -> Tensor:
        return self.fc(self.dropout(torch.cat(self.gather(feats), dim=1)))


@HEADS.register("sum")
class SumHead(Head):
    """Late fusion at the logit level: sum of per-expert linear classifiers.

    ``Σ_e Linear_e(dropout(feat_e))`` with ``Linear_e: D_e → classes`` under ``fcs.<expert>``
    (each with its own bias). Experts may have different widths.

    Args: ``dims``, ``experts``, ``classes``, ``pool``, ``dropout``, ``init_scale``, ``multilabel``,
    ``label_smoothing``, ``name`` (as for ``adapter_sum``).
    """

    kind = "sum"

    def __init__(self, *, dims: Mapping[str, int], experts: Sequence[str], classes: int, pool: PoolSpec = None,
                 dropout: float = 0.0, init_scale: float = 1.0, multilabel: bool = False,
                 label_smoothing: float = 0.0, name: str | None = None) -> None:
        super().__init__(dims=dims, experts=experts, classes=classes, pool=pool, multilabel=multilabel,
                         label_smoothing=label_smoothing, name=name)
        self.dropout = nn.Dropout(_check_dropout(self, dropout))
        self.fcs = nn.ModuleDict({e: _init_linear(nn.Linear(d, classes), init_scale) for e, d in self.dims.items()})

    def forward(self, feats: Mapping[str, Tensor]) -> Tensor:
        out = None
        for e, x in zip(self.dims, self.gather(feats)):
            y = self.fcs[e](self.dropout(x))
            out = y if out is None else out + y
        return out


_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "none": nn.Identity}


@HEADS.register("mlp")
class MLPHead(Head):
    """Two-layer MLP on the concatenated expert features (LAVISH / AV-STFP classifier).

    ``concat_e feat_e → Linear(Σ D_e, hidden) → act → dropout → Linear(hidden, classes)``;
    parameters ``fc1.*``, ``fc2.*``. LAVISH's AVE head (two linears, no activation) is
    ``act: none, hidden: 512``.

    Args:
        dims, experts, classes, pool: as for ``concat``.
        hidden: width of the hidden layer.
        act: ``gelu`` (default), ``relu``, ``tanh`` or ``none``.
        dropout: dropout after the activation.
        init_scale: multiplies the initial weight and bias of the last linear.
        multilabel, label_smoothing, name: see :class:`Head`.
    """

    kind = "mlp"

    def __init__(self, *, dims: Mapping[str, int], experts: Sequence[str], classes: int, hidden: int = 512,
                 act: str = "gelu", pool: PoolSpec = None, dropout: float = 0.0, init_scale: float = 1.0,
                 multilabel: bool = False, label_smoothing: float = 0.0, name: str | None = None) -> None:
        super().__init__(dims=dims, experts=experts, classes=classes, pool=pool, multilabel=multilabel,
                         label_smoothing=label_smoothing, name=name)
        if act not in _ACTIVATIONS:
            raise ValueError(f"{self.label}: unknown act {act!r}; valid: {', '.join(_ACTIVATIONS)}")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"{self.label}: hidden must be a positive int, got {hidden!r}")
        self.fc1 = _init_linear(nn.Linear(sum(self.dims.values()), hidden))
        self.act = _ACTIVATIONS[act]()
        self.dropout = nn.Dropout(_check_dropout(self, dropout))
        self.fc2 = _init_linear(nn.Linear(hidden, classes), init_scale)

    def forward(self, feats: Mapping[str, Tensor]) -> Tensor:
        x = torch.cat(self.gather(feats), dim=1)
        return self.fc2(self.dropout(self.act(self.fc1(x))))


def total_loss(heads: Mapping[str, Head], logits: Mapping[str, Tensor], targets: Mapping[str, Tensor],
               weights: Mapping[str, float] | None = None) -> tuple[Tensor, dict[str, float]]:
    """Sum of the heads' losses (EK100: CE(verb) + CE(noun)).

    Args:
        heads: head name → head.
        logits: head name → logits ``(B, classes)`` of that head.
        targets: label name → target (see :meth:`Head.loss`); a head reads the label named by its
            ``target`` attribute (the recipe's ``heads.<name>.target``), by default its own name.
        weights: optional head name → loss weight (default 1 for every head).

    Returns:
        The total loss (scalar tensor, differentiable) and head name → its unweighted loss as a
        float (for logging; one device sync per head).

    Raises:
        KeyError: a head without logits or without a target (the message names it).
    """
    if not heads:
        raise ValueError("total_loss: no heads")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(heads))
    if unknown:
        raise KeyError(f"total_loss: loss weights given for unknown head(s) {unknown}; heads are {sorted(heads)}")
    total = None
    parts: dict[str, float] = {}
    for key, head in heads.items():
        if key not in logits:
            raise KeyError(f"total_loss: no logits for head {key!r}; logits given for {sorted(logits)}")
        target = getattr(head, "target", None) or key  # a head may train on another label (recipe key `target`)
        if target not in targets:
            raise KeyError(f"total_loss: no target for head {key!r} (label {target!r}); targets given for "
                           f"{sorted(targets)}")
        label = head.label if head.name else f"head {key!r} ({head.kind})"
        loss = head._loss(logits[key], targets[target], label)
        parts[key] = float(loss.detach())
        term = loss * weights[key] if key in weights else loss
        total = term if total is None else total + term
    return total, parts

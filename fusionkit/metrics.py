"""Evaluation metrics: pure functions on tensors, and a small accumulator for whole epochs.

Shapes: ``N`` samples, ``C`` classes. Single-label targets are integer class ids ``(N,)``;
multi-label targets are ``(N, C)`` with entries in ``{0, 1}``. Scores may be logits or
probabilities (every metric here depends only on the ranking of scores within a row or a
column, which softmax/sigmoid preserve).

Units follow the literature: accuracies and mean class accuracy in percent, mean average
precision as a fraction in ``[0, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def _check_single(logits: Tensor, target: Tensor, what: str = "") -> None:
    pre = f"{what}: " if what else ""
    if logits.dim() != 2:
        raise ValueError(f"{pre}scores must be (N, C), got shape {tuple(logits.shape)}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"{pre}target must be (N,) = ({logits.shape[0]},) class ids, got shape {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"{pre}target must hold integer class ids, got {target.dtype}")


def topk_correct(logits: Tensor, target: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, Tensor]:
    """Per-sample top-k hits.

    Args:
        logits: scores ``(N, C)``.
        target: class ids ``(N,)``.
        ks: the ``k`` values; a ``k`` larger than ``C`` is clamped to ``C`` (always a hit).

    Returns:
        ``k`` → bool ``(N,)``, true where the target is among the ``k`` highest scores
        (ties broken by ``torch.topk``).
    """
    _check_single(logits, target, "topk_correct")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"topk_correct: ks must be positive, got {tuple(ks)}")
    kmax = min(max(int(k) for k in ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (N, kmax)
    hit = top == target.to(top.device).long().unsqueeze(1)  # (N, kmax)
    return {int(k): hit[:, : min(int(k), kmax)].any(dim=1) for k in ks}


def accuracy(logits: Tensor, target: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent: ``{"top1": .., "top5": ..}`` (keys use the requested ``k``).

    ``logits`` ``(N, C)``, ``target`` ``(N,)``; ``k > C`` is clamped to ``C``; ``N = 0`` gives NaN.
    """
    hits = topk_correct(logits, target, ks)
    n = logits.shape[0]
    return {f"top{k}": (100.0 * float(h.sum()) / n if n else math.nan) for k, h in hits.items()}


def action_correct(logits: Mapping[str, Tensor], targets: Mapping[str, Tensor], heads: Sequence[str]) -> Tensor:
    """Action hits: bool ``(N,)``, true iff the argmax of every head in ``heads`` is right (EK100: verb and noun).

    ``logits[h]`` ``(N, C_h)``, ``targets[h]`` ``(N,)`` for each ``h`` in ``heads``.
    """
    if not heads:
        raise ValueError("action_correct: no heads")
    out = None
    for h in heads:
        if h not in logits or h not in targets:
            raise KeyError(f"action_correct: head {h!r} missing from logits ({sorted(logits)}) or "
                           f"targets ({sorted(targets)})")
        hit = topk_correct(logits[h], targets[h], (1,))[1]
        if out is not None and hit.shape != out.shape:
            raise ValueError(f"action_correct: head {h!r} has {hit.shape[0]} samples, the others {out.shape[0]}")
        out = hit if out is None else out & hit
    return out


def mean_class_accuracy(logits: Tensor, target: Tensor, num_classes: int | None = None) -> float:
    """Mean over the classes present in ``target`` of per-class top-1 recall, in percent.

    ``logits`` ``(N, C)``, ``target`` ``(N,)``; ``num_classes`` defaults to ``C`` (classes absent
    from ``target`` do not count). ``N = 0`` gives NaN.
    """
    _check_single(logits, target, "mean_class_accuracy")
    c = logits.shape[1] if num_classes is None else int(num_classes)
    if logits.shape[0] == 0:
        return math.nan
    target = target.long().cpu()
    if int(target.min()) < 0 or int(target.max()) >= c:
        raise ValueError(f"mean_class_accuracy: class ids must lie in [0, {c}), got range "
                         f"[{int(target.min())}, {int(target.max())}]")
    pred = logits.argmax(dim=1).cpu()
    count = torch.bincount(target, minlength=c).double()
    right = torch.bincount(target[pred == target], minlength=c).double()
    present = count > 0
    return 100.0 * float((right[present] / count[present]).mean())


def average_precision(scores: Tensor, target: Tensor) -> float:
    """Average precision of one class: ``Σ_n (R_n − R_{n−1}) · P_n`` over the distinct score thresholds.

    ``scores`` ``(N,)``, ``target`` ``(N,)`` in ``{0, 1}``. Tied scores form one threshold (as in
    scikit-learn's ``average_precision_score``); without ties this is the mean over positives of
    the precision at each positive's rank. NaN when there is no positive.
    """
    scores = scores.detach().double().cpu().reshape(-1)
    target = target.detach().double().cpu().reshape(-1)
    pos = float(target.sum())
    if pos == 0:
        return math.nan
    order = torch.argsort(scores, descending=True, stable=True)
    s, t = scores[order], target[order]
    tp = torch.cumsum(t, 0)
    seen = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # last index of every group of equal scores = one threshold
    last = torch.ones(len(s), dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tp, seen = tp[last], seen[last]
    precision = tp / seen
    recall_step = torch.diff(tp, prepend=tp.new_zeros(1)) / pos
    return float((recall_step * precision).sum())


def mean_average_precision(scores: Tensor, target: Tensor) -> float:
    """Multi-label mAP in ``[0, 1]``: mean over classes with at least one positive of the AP.

    ``scores`` ``(N, C)`` (logits or probabilities), ``target`` ``(N, C)`` in ``{0, 1}``; a
    single-label ``(N,)`` target of class ids is turned into one-hot (EPIC-SOUNDS reports mAP so).
    NaN when no class has a positive.
    """
    if scores.dim() != 2:
        raise ValueError(f"mean_average_precision: scores must be (N, C), got shape {tuple(scores.shape)}")
    if target.dim() == 1 and not target.dtype.is_floating_point:
        _check_single(scores, target, "mean_average_precision")
        target = torch.nn.functional.one_hot(target.long().cpu(), scores.shape[1])
    if target.shape != scores.shape:
        raise ValueError(f"mean_average_precision: target must be (N, C) = {tuple(scores.shape)}, "
                         f"got shape {tuple(target.shape)}")
    aps = [average_precision(scores[:, j], target[:, j]) for j in range(scores.shape[1])]
    aps = [a for a in aps if not math.isnan(a)]
    return sum(aps) / len(aps) if aps else math.nan


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean ``n / Σ 1/v`` of non-negative values (0 if any is 0)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("harmonic_mean: no values")
    if any(v < 0 or math.isnan(v) for v in vals):
        raise ValueError(f"harmonic_mean: values must be non-negative numbers, got {vals}")
    if any(v == 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


class MetricTracker:
    """Collects per-head logits and targets over batches and computes every metric at the end.

    Stored on the CPU, detached, as float32. With ``clip_ids`` (one id per sample, e.g. the
    video path) the views of one clip (crops × temporal clips at test time) are merged before
    scoring: their softmax (single-label) or sigmoid (multi-label) scores are averaged; their
    targets must agree.

    Args:
        multilabel: names of the multi-label heads (or head → bool).
        ks: top-k accuracies reported for single-label heads.
        action: heads whose joint top-1 is reported as ``action/top1`` when all of them are
            tracked (EK100: ``("verb", "noun")``); ``None`` (default): no action metric.
        single_label_map: also report ``<head>/mAP`` for single-label heads (one-hot targets).

    Keys of :meth:`compute`: ``<head>/top1``, ``<head>/top5``, ``<head>/mca`` for single-label
    heads, ``<head>/mAP`` for multi-label heads, ``action/top1`` (with ``action``), and
    ``num_samples`` (clips after merging views).

    Example::

        tracker = MetricTracker.for_heads(model.heads)
        for batch in loader:
            tracker.update(model(batch), batch["targets"], clip_ids=batch["clip_id"])
        print(tracker.compute())
    """

    def __init__(self, multilabel: Iterable[str] | Mapping[str, bool] = (), ks: Sequence[int] = (1, 5),
                 action: Sequence[str] | None = None, single_label_map: bool = False) -> None:
        if isinstance(multilabel, Mapping):
            self.multilabel = {k for k, v in multilabel.items() if v}
        else:
            self.multilabel = set(multilabel)
        self.ks = tuple(int(k) for k in ks)
        self.action = tuple(action) if action else None
        self.single_label_map = single_label_map
        self.reset()

    @classmethod
    def for_heads(cls, heads: Mapping[str, Any], **kwargs: Any) -> MetricTracker:
        """A tracker whose multi-label set comes from the heads' ``multilabel`` attributes."""
        return cls(multilabel={k: bool(getattr(h, "multilabel", False)) for k, h in heads.items()}, **kwargs)

    def reset(self) -> None:
        self._logits: dict[str, list[Tensor]] = {}
        self._targets: dict[str, list[Tensor]] = {}
        self._ids: list[Hashable] = []
        self._with_ids: bool | None = None
        self._n = 0

    def __len__(self) -> int:
        """Samples (views) collected so far."""
        return self._n

    def update(self, logits: Mapping[str, Tensor], targets: Mapping[str, Tensor],
               clip_ids: Sequence[Hashable] | Tensor | None = None) -> None:
        """Add one batch: ``logits[h]`` ``(B, C_h)``, ``targets[h]`` ``(B,)`` or ``(B, C_h)``, ``clip_ids`` ``(B,)``.

        Every batch must track the same heads, and either all or no batch give ``clip_ids``.
        """
        if not logits:
            raise ValueError("MetricTracker.update: no logits")
        heads = sorted(logits)
        if self._logits and heads != sorted(self._logits):
            raise KeyError(f"MetricTracker.update: heads {heads} differ from earlier batches {sorted(self._logits)}")
        missing = [h for h in heads if h not in targets]
        if missing:
            raise KeyError(f"MetricTracker.update: no target for head(s) {missing}; targets given for {sorted(targets)}")
        b = None
        for h in heads:
            x, t = logits[h], targets[h]
            if x.dim() != 2:
                raise ValueError(f"MetricTracker.update: logits of head {h!r} must be (B, C), got {tuple(x.shape)}")
            if b is None:
                b = x.shape[0]
            if x.shape[0] != b or t.shape[0] != b:
                raise ValueError(f"MetricTracker.update: head {h!r} has logits {tuple(x.shape)} and target "
                                 f"{tuple(t.shape)}; expected batch size {b}")
            if h in self.multilabel:
                if tuple(t.shape) != tuple(x.shape):
                    raise ValueError(f"MetricTracker.update: multi-label target of head {h!r} must be "
                                     f"{tuple(x.shape)}, got {tuple(t.shape)}")
            else:
                _check_single(x, t, f"MetricTracker.update, head {h!r}")
        if (clip_ids is not None) != bool(self._with_ids) and self._with_ids is not None:
            raise ValueError("MetricTracker.update: give clip_ids with every batch or with none")
        self._with_ids = clip_ids is not None
        if clip_ids is not None:
            ids = clip_ids.tolist() if isinstance(clip_ids, Tensor) else list(clip_ids)
            if len(ids) != b:
                raise ValueError(f"MetricTracker.update: {len(ids)} clip ids for a batch of {b}")
            self._ids.extend(ids)
        for h in heads:
            self._logits.setdefault(h, []).append(logits[h].detach().float().cpu())
            t = targets[h].detach().cpu()
            self._targets.setdefault(h, []).append(t.float() if h in self.multilabel else t.long())
        self._n += b

    def scores(self) -> tuple[dict[str, Tensor], dict[str, Tensor], list[Hashable] | None]:
        """Per-clip scores (probabilities, views averaged), targets and clip ids (first-seen order).

        Returns ``(scores, targets, ids)`` with ``scores[h]`` ``(M, C_h)``, ``targets[h]``
        ``(M,)`` or ``(M, C_h)``; without clip ids ``M = N`` and ``ids`` is None.
        """
        probs, targets = {}, {}
        for h, chunks in self._logits.items():
            x = torch.cat(chunks)
            probs[h] = torch.sigmoid(x) if h in self.multilabel else torch.softmax(x, dim=1)
            targets[h] = torch.cat(self._targets[h])
        if not self._with_ids:
            return probs, targets, None
        index: dict[Hashable, int] = {}
        group = torch.tensor([index.setdefault(i, len(index)) for i in self._ids], dtype=torch.long)
        m = len(index)
        counts = torch.bincount(group, minlength=m).to(torch.float32)
        for h in probs:
            p = probs[h]
            summed = torch.zeros(m, p.shape[1]).index_add_(0, group, p)
            probs[h] = summed / counts.unsqueeze(1)
            t = targets[h]
            first = torch.full((m,), -1, dtype=torch.long)
            first.scatter_reduce_(0, group, torch.arange(len(group)), reduce="amin", include_self=False)
            merged = t[first]
            if not torch.equal(merged[group], t):
                bad = int((merged[group] != t).reshape(len(group), -1).any(dim=1).nonzero()[0])
                raise ValueError(f"MetricTracker: views of clip {self._ids[bad]!r} disagree on the target of head {h!r}")
            targets[h] = merged
        return probs, targets, list(index)

    def compute(self) -> dict[str, float]:
        """Every metric over what was collected (see the class docstring for the keys)."""
        if not self._n:
            raise ValueError("MetricTracker.compute: nothing collected")
        probs, targets, _ = self.scores()
        out: dict[str, float] = {}
        for h in sorted(probs):
            p, t = probs[h], targets[h]
            if h in self.multilabel:
                out[f"{h}/mAP"] = mean_average_precision(p, t)
                continue
            for key, value in accuracy(p, t, self.ks).items():
                out[f"{h}/{key}"] = value
            out[f"{h}/mca"] = mean_class_accuracy(p, t)
            if self.single_label_map:
                out[f"{h}/mAP"] = mean_average_precision(p, t)
        if self.action and all(h in probs and h not in self.multilabel for h in self.action):
            out["action/top1"] = 100.0 * float(action_correct(probs, targets, self.action).float().mean())
        out["num_samples"] = float(next(iter(probs.values())).shape[0])
        return out

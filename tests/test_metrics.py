"""Metrics on hand-constructed predictions, and the tracker's multi-view averaging."""

from __future__ import annotations

import math

import pytest
import torch

from fusionkit.heads import LinearHead
from fusionkit.metrics import (MetricTracker, accuracy, action_correct, average_precision, harmonic_mean,
                               mean_average_precision, mean_class_accuracy, topk_correct)


def ranked(orders: list[list[int]], classes: int) -> torch.Tensor:
    """Logits whose descending order of classes in row i is orders[i] (unlisted classes last)."""
    out = torch.full((len(orders), classes), -100.0)
    for i, order in enumerate(orders):
        for rank, c in enumerate(order):
            out[i, c] = float(classes - rank)
    return out


def test_topk_and_accuracy_known_values():
    logits = ranked([[0, 1, 2, 3, 4, 5, 6], [1, 0, 2, 3, 4, 5, 6], [2, 3, 4, 5, 6, 0, 1], [6, 5, 4, 3, 2, 1, 0]], 7)
    target = torch.tensor([0, 0, 1, 2])  # top1 hit; top2..5; rank 7; rank 5
    hits = topk_correct(logits, target, (1, 5))
    assert hits[1].tolist() == [True, False, False, False]
    assert hits[5].tolist() == [True, True, False, True]
    assert accuracy(logits, target) == {"top1": 25.0, "top5": 75.0}
    # k larger than the class count is clamped: every sample is a hit
    assert accuracy(logits[:, :3].contiguous(), torch.tensor([0, 0, 1, 2]), ks=(1, 5))["top5"] == 100.0
    with pytest.raises(ValueError, match=r"\(N,\) = \(4,\)"):
        accuracy(logits, torch.tensor([0, 1]))


def test_action_correct_needs_every_head_right():
    verb = ranked([[0, 1], [1, 0], [0, 1]], 2)
    noun = ranked([[2, 0, 1], [2, 0, 1], [1, 0, 2]], 3)
    targets = {"verb": torch.tensor([0, 1, 1]), "noun": torch.tensor([2, 0, 1])}
    # sample 0 both right; sample 1 verb right, noun wrong; sample 2 verb wrong, noun right
    assert action_correct({"verb": verb, "noun": noun}, targets, ("verb", "noun")).tolist() == [True, False, False]
    assert action_correct({"verb": verb, "noun": noun}, targets, heads=("verb",)).tolist() == [True, True, False]
    with pytest.raises(KeyError, match="'noun'"):
        action_correct({"verb": verb}, targets, ("verb", "noun"))


def test_mean_class_accuracy_with_imbalanced_classes():
    target = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 2])
    logits = ranked([[0]] * 9 + [[2]], 4)  # always class 0 except the last sample
    assert accuracy(logits, target, (1,))["top1"] == pytest.approx(90.0)
    # class 0: 8/8, class 1: 0/1, class 2: 1/1; class 3 absent from target does not count
    assert mean_class_accuracy(logits, target, num_classes=4) == pytest.approx(100 * (1 + 0 + 1) / 3)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        mean_class_accuracy(logits, target, num_classes=2)


def test_mean_average_precision_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.3],
                           [0.8, 0.4, 0.2],
                           [0.7, 0.35, 0.1],
                           [0.6, 0.8, 0.0]])
    target = torch.tensor([[1, 0, 0],
                           [0, 1, 0],
                           [1, 0, 0],
                           [0, 0, 0]])
    # class 0: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2; class 1: positive at rank 2 -> 1/2;
    # class 2 has no positive and is left out
    ap0, ap1 = (1 + 2 / 3) / 2, 0.5
    assert average_precision(scores[:, 0], target[:, 0]) == pytest.approx(ap0)
    assert math.isnan(average_precision(scores[:, 2], target[:, 2]))
    assert mean_average_precision(scores, target) == pytest.approx((ap0 + ap1) / 2)
    assert mean_average_precision(torch.logit(scores.clamp(1e-4, 1 - 1e-4)), target) == pytest.approx((ap0 + ap1) / 2)
    # tied scores form one threshold: precision 1/2 at recall 1
    assert average_precision(torch.tensor([0.5, 0.5, 0.1]), torch.tensor([1, 0, 0])) == pytest.approx(0.5)
    # single-label targets are one-hot: class 0 AP 1, class 1 AP 1/2
    assert mean_average_precision(torch.tensor([[0.9, 0.8], [0.2, 0.1]]), torch.tensor([0, 1])) == pytest.approx(0.75)


def test_harmonic_mean():
    assert harmonic_mean([40.0, 60.0]) == pytest.approx(48.0)
    assert harmonic_mean([50.0]) == 50.0
    assert harmonic_mean([0.0, 80.0]) == 0.0
    with pytest.raises(ValueError):
        harmonic_mean([])


def probs_to_logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows).log()


def test_tracker_multi_view_averaging_changes_prediction():
    # clip "a": view 1 mildly class 0, view 2 strongly class 1 -> mean [0.35, 0.65] -> class 1 (right);
    # clip "b": one view, right
    verb = probs_to_logits([[0.6, 0.4], [0.1, 0.9], [0.8, 0.2]])
    target = torch.tensor([1, 1, 0])
    per_view = MetricTracker(ks=(1,))
    per_view.update({"verb": verb}, {"verb": target})
    assert per_view.compute()["verb/top1"] == pytest.approx(100 * 2 / 3)

    merged = MetricTracker(ks=(1,))
    merged.update({"verb": verb[:2]}, {"verb": target[:2]}, clip_ids=["a", "a"])
    merged.update({"verb": verb[2:]}, {"verb": target[2:]}, clip_ids=["b"])
    scores, targets, ids = merged.scores()
    assert ids == ["a", "b"]
    assert torch.allclose(scores["verb"], torch.tensor([[0.35, 0.65], [0.8, 0.2]]))
    assert targets["verb"].tolist() == [1, 0]
    out = merged.compute()
    assert out["verb/top1"] == 100.0 and out["num_samples"] == 2.0

    bad = MetricTracker()
    bad.update({"verb": verb[:2]}, {"verb": torch.tensor([0, 1])}, clip_ids=torch.tensor([7, 7]))
    with pytest.raises(ValueError, match="clip 7 disagree.*'verb'"):
        bad.compute()
    with pytest.raises(ValueError, match="clip_ids"):
        bad.update({"verb": verb[:1]}, {"verb": target[:1]})


def test_tracker_ek100_and_multilabel_keys():
    heads = {"verb": LinearHead(dims={"t": 4}, expert="t", classes=2),
             "noun": LinearHead(dims={"s": 4}, expert="s", classes=3),
             "tags": LinearHead(dims={"s": 4}, expert="s", classes=3, multilabel=True)}
    tracker = MetricTracker.for_heads(heads, ks=(1, 5), action=("verb", "noun"))
    verb = ranked([[0, 1], [1, 0], [0, 1]], 2)
    noun = ranked([[2, 0, 1], [2, 0, 1], [1, 0, 2]], 3)
    tags = torch.tensor([[0.9, 0.1, 0.3], [0.8, 0.4, 0.2], [0.7, 0.35, 0.1]]).logit()
    targets = {"verb": torch.tensor([0, 1, 1]), "noun": torch.tensor([2, 0, 1]),
               "tags": torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 0, 0]])}
    tracker.update({"verb": verb[:2], "noun": noun[:2], "tags": tags[:2]}, {k: v[:2] for k, v in targets.items()})
    tracker.update({"verb": verb[2:], "noun": noun[2:], "tags": tags[2:]}, {k: v[2:] for k, v in targets.items()})
    assert len(tracker) == 3
    out = tracker.compute()
    assert out["verb/top1"] == pytest.approx(200 / 3) and out["noun/top1"] == pytest.approx(200 / 3)
    assert out["noun/top5"] == 100.0
    assert out["action/top1"] == pytest.approx(100 / 3)
    assert out["verb/mca"] == pytest.approx(100 * (1 + 0.5) / 2)
    assert out["tags/mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1.0) / 2)
    assert "tags/top1" not in out and "verb/mAP" not in out
    with pytest.raises(KeyError, match="no target for head"):
        MetricTracker().update({"verb": verb}, {})

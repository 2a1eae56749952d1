"""The action metric is the recipe's: ``action/top1`` (the joint top-1 of ``train.action``'s heads) appears
only when the recipe names those heads; the engine and the metrics know no head names of their own."""

from __future__ import annotations

import pytest

import fusionkit  # noqa: F401 - registers the built-ins
from fusionkit.engine.config import train_config
from fusionkit.engine.evaluate import run_eval
from fusionkit.recipes import load_recipe

FAST = ["data.val.size=16", "eval.batch_size=16"]


@pytest.mark.parametrize(("recipe", "action"), [("tiny", ["verb", "noun"]), ("cast", ["verb", "noun"]),
                                                ("cast_ensemble", ["verb", "noun"]), ("cast_k400", []),
                                                ("cava", None), ("mmvit_iii_merged", None)])
def test_recipes_declare_their_action_heads(recipe, action):
    assert train_config(load_recipe(recipe))["action"] == action


def test_action_metric_only_when_the_recipe_declares_it():
    declared = run_eval("tiny", None, FAST, progress=False)
    assert {"verb/top1", "noun/top1", "action/top1"} <= set(declared)
    assert 0 <= declared["action/top1"] <= min(declared["verb/top1"], declared["noun/top1"])
    undeclared = run_eval("tiny", None, [*FAST, "train.action=null"], progress=False)
    assert "action/top1" not in undeclared
    assert {k: v for k, v in declared.items() if k != "action/top1"} == undeclared

"""One seed rule for every rebuild of a model (eval, predict, load_model): the checkpoint's build_seed,
else the recipe's train.seed."""

import torch

from fusionkit.engine.checkpoint import rebuild
from fusionkit.recipes import build_from_config, load_recipe


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_without_a_checkpoint_the_recipe_seed_builds_the_model():
    cfg = load_recipe("tiny", ["train.seed=3"])
    torch.manual_seed(3)
    want = state(build_from_config(cfg))
    got = state(rebuild(cfg)[0])
    assert all(torch.equal(want[k], got[k]) for k in want)
    other = state(rebuild(load_recipe("tiny", ["train.seed=4"]))[0])
    assert not all(torch.equal(want[k], other[k]) for k in want)  # the seed is what decides

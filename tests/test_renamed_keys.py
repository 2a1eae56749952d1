"""Renamed recipe keys (one name, one meaning): operators' ``steps`` (was ``layers``), experts'
``frame_select`` (was ``frames``), spectrogram images' ``target_length`` (was ``frames``). The old
names still load (stored run recipes, users' files, overrides) with one warning each."""

from __future__ import annotations

import textwrap
import warnings

import pytest
import torch

import fusionkit
from fusionkit.recipes import RecipeError, load_recipe


def loaded(*args, **kwargs) -> tuple[dict, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_recipe(*args, **kwargs)
    return cfg, [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def test_old_names_in_a_file_load_as_the_new_ones(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(textwrap.dedent("""\
        _base_: tiny
        experts:
          spatial: {frames: {stride: 2, offset: 1}}
        fusion:
          bca: {layers: [1]}
        """))
    cfg, said = loaded(str(old))
    new, quiet = loaded("tiny", ["fusion.bca.steps=[1]"])
    assert cfg == new and not quiet
    assert said == [f"recipe key fusion.bca.layers is now fusion.bca.steps ({old.resolve()}); the old name still works",
                    f"recipe key experts.spatial.frames is now experts.spatial.frame_select ({old.resolve()}); "
                    "the old name still works"]
    torch.manual_seed(0)
    a = fusionkit.build(cfg)
    torch.manual_seed(0)
    b = fusionkit.build(new)
    assert [k for k in a.state_dict()] == [k for k in b.state_dict()]
    assert sorted(a.fusions.bca) == ["1"]


def test_old_override_and_mapping_and_frontend_names(tmp_path):
    cfg, said = loaded("tiny", ["fusion.bca.layers=0:1"])
    assert cfg["fusion"]["bca"]["steps"] == "0:1" and "layers" not in cfg["fusion"]["bca"]
    assert said == ["recipe key fusion.bca.layers is now fusion.bca.steps (override); the old name still works"]
    recipe = load_recipe("binding/avstfp")
    frontend = recipe["experts"]["audio"]["frontend"]
    frontend["frames"] = frontend.pop("target_length")
    cfg, said = loaded(recipe)
    assert cfg["experts"]["audio"]["frontend"]["target_length"] == 12 and len(said) == 1


def test_old_and_new_name_together_is_one_error():
    with pytest.raises(RecipeError, match=r"recipe override: fusion\.bca\.layers is the old name of fusion\.bca\.steps; "
                                          r"give only steps"):
        load_recipe("tiny", ["fusion.bca.layers=[0]", "fusion.bca.steps=[1]"])

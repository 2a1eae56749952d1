"""The recipe search path: ``$FUSIONKIT_RECIPES``, the packaged recipes, plugin folders, ``list_recipes``.

The packaged recipes are the data package ``fusionkit._recipes`` (pyproject.toml maps it onto
``recipes/``); tests/test_wheel.py checks that a built wheel and an editable install both find them.
"""

from __future__ import annotations

import os
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import setuptools
import torch

import fusionkit
from fusionkit import recipes
from fusionkit.cli import main
from fusionkit.recipes import RECIPE_DIR, RecipeError, list_recipes, load_recipe, recipe_path, register_recipe_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """A researcher's folder on ``$FUSIONKIT_RECIPES`` (after a missing one): ``lab/small`` inherits from a
    file beside it through a relative ``_base_``, and ``tiny`` shadows the packaged recipe."""
    folder = tmp_path / "my_recipes"
    (folder / "lab").mkdir(parents=True)
    (folder / "lab" / "base.yaml").write_text((RECIPE_DIR / "tiny.yaml").read_text())
    (folder / "lab" / "small.yaml").write_text("_base_: base.yaml\ndescription: my small model\n"
                                               "heads: {verb: {classes: 7}}\n")
    (folder / "tiny.yaml").write_text(f"_base_: {RECIPE_DIR / 'tiny.yaml'}\ndescription: my own tiny\n")
    monkeypatch.setenv("FUSIONKIT_RECIPES", os.pathsep.join([str(tmp_path / "missing"), str(folder)]))
    return folder


def test_packaged_recipes_are_the_repository_folder():
    assert RECIPE_DIR.resolve() == (ROOT / "recipes").resolve()
    assert recipe_path("cast") == RECIPE_DIR / "cast.yaml"
    assert recipe_path("binding/bca") == RECIPE_DIR / "binding" / "bca.yaml"


def test_env_folder_found_before_packaged(lab):
    assert recipes.recipe_dirs()[1:3] == [lab, RECIPE_DIR]
    assert recipe_path("lab/small") == lab / "lab" / "small.yaml"
    assert recipe_path("tiny") == lab / "tiny.yaml"  # the user's folder comes first
    assert load_recipe("tiny")["description"] == "my own tiny"
    model = fusionkit.build("lab/small").eval()  # _base_ relative to the file, in the user's folder
    with torch.no_grad():
        logits = model({m: torch.randn(2, *s) for m, s in model.input_shapes.items()})
    assert logits["verb"].shape == (2, 7) and logits["noun"].shape == (2, 5)
    assert load_recipe("binding/bca")["fusion"]["bca"]["type"] == "bca"  # packaged ones still resolve


def test_list_recipes_shows_packaged_and_extra(lab):
    names = list_recipes()
    assert names == sorted(names) == fusionkit.list_recipes()
    assert {"cast", "tiny", "binding/bca", "binding/pretrain_spatial", "lab/small", "lab/base"} <= set(names)
    assert names.count("tiny") == 1
    assert not [n for n in names if n.startswith("ablations/")]  # ablation files are not recipes
    assert recipes.recipe_index()["tiny"] == lab / "tiny.yaml"


def test_unknown_name_is_one_line_naming_folders_and_closest(lab):
    with pytest.raises(RecipeError) as err:
        load_recipe("lab/smal")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("recipe 'lab/smal' not found (neither a file nor a name in ")
    assert f"{lab}{os.pathsep}{RECIPE_DIR}" in msg
    assert msg.split("closest recipes: ")[1].startswith("lab/small")


def test_repository_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert recipe_path("recipes/cast.yaml") == RECIPE_DIR / "cast.yaml"
    assert recipe_path("recipes/binding/bca.yaml") == RECIPE_DIR / "binding" / "bca.yaml"
    assert load_recipe("recipes/binding/bca.yaml") == load_recipe("binding/bca")


def test_register_recipe_dir_from_a_plugin(tmp_path, monkeypatch):
    """A plugin's entry point module registers its folder on import; it comes after the packaged recipes."""
    shipped = tmp_path / "fk_recipe_plugin_recipes"
    shipped.mkdir()
    (shipped / "plugged.yaml").write_text(f"_base_: {RECIPE_DIR / 'tiny.yaml'}\ndescription: from a plugin\n")
    (shipped / "cast.yaml").write_text("description: must not shadow the packaged cast\n")
    (tmp_path / "fk_recipe_plugin.py").write_text(textwrap.dedent(f'''
        from fusionkit import register_recipe_dir

        register_recipe_dir({str(shipped)!r})
    '''))
    dist = tmp_path / "fk_recipe_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fk-recipe-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fusionkit.plugins]\nrecipes = fk_recipe_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(recipes, "_registered_dirs", [])
    monkeypatch.delenv("FUSIONKIT_RECIPES", raising=False)
    try:
        assert "recipes" in fusionkit.registry.load_plugins(force=True)
        assert recipes.recipe_dirs() == [RECIPE_DIR, shipped]
        assert recipe_path("plugged") == shipped / "plugged.yaml"
        assert recipe_path("cast") == RECIPE_DIR / "cast.yaml"
        assert "plugged" in list_recipes()
        assert register_recipe_dir(shipped) == shipped and recipes._registered_dirs == [shipped]
        with pytest.raises(RecipeError, match="is not a folder"):
            register_recipe_dir(tmp_path / "nowhere")
    finally:
        sys.modules.pop("fk_recipe_plugin", None)


def test_cli_list_shows_recipes(lab, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("recipes: named recipes"):]
    assert "binding/bca" in section and "lab/small" in section and "my small model" in section
    assert "CAST, EK100 composition" in section


def test_pyproject_lists_every_package():
    """``packages`` is a list (``find`` cannot add the mapped data package): it must name every package."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = setuptools.find_packages(str(ROOT), include=["fusionkit*"])
    assert sorted(config["packages"]) == sorted([*found, "fusionkit._recipes"])
    assert config["package-dir"] == {"fusionkit._recipes": "recipes"}
    assert (ROOT / "recipes" / "__init__.py").is_file()  # a regular package: an editable install finds it


def test_an_entry_whose_type_changes_replaces_the_inherited_one(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("_base_: tiny\ndata:\n  train: {type: manifest, path: train.csv, frames: 4, size: 32}\n")
    assert load_recipe(str(mine))["data"]["train"] == {"type": "manifest", "path": "train.csv", "frames": 4, "size": 32}
    assert load_recipe(str(mine))["data"]["val"]["type"] == "synthetic"   # untouched entries are inherited
    given = load_recipe("tiny", ["data.val.type=manifest", "data.val.path=v.csv"])["data"]["val"]
    assert given == {"type": "manifest", "path": "v.csv"}
    kept = load_recipe("tiny", ["fusion.bca.type=bca", "fusion.bca.heads=4"])["fusion"]["bca"]   # same type: merged
    assert kept["heads"] == 4 and kept["directions"] == load_recipe("tiny")["fusion"]["bca"]["directions"]

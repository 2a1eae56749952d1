"""The command line's error path: every user mistake below ends in one line ``error: ...`` on stderr
naming the key / file / expected value, exit status 2 and no traceback (``--debug`` shows it);
overrides are accepted anywhere after RECIPE."""

from __future__ import annotations

import csv
import os

import pytest
import torch
from safetensors.torch import save_file

import fusionkit  # noqa: F401 - registers the built-ins
from fusionkit.cli import build_parser, main, parse_args
from fusionkit.data.manifest import Manifest
from fusionkit.data.synthetic import SyntheticDataset
from fusionkit.errors import FusionkitError
from fusionkit.recipes import RecipeError


def one_error(capsys, argv: list[str], *names: str) -> str:
    """Run ``fusionkit argv``; assert exit 2 and one ``error:`` line on stderr naming each of ``names``."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture
def clip(tmp_path):
    path = tmp_path / "clip.safetensors"
    save_file(SyntheticDataset(size=2, seed=1).example(0), str(path))
    return path


def test_wrong_recipe_name(capsys):
    one_error(capsys, ["describe", "tinny"], "'tinny' not found", "tiny")
    one_error(capsys, ["train", "tinny"], "'tinny' not found")


def test_yaml_syntax_error_names_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nexperts:\n  spatial: {type: timm_vit\n  temporal: [1, 2\n")
    one_error(capsys, ["describe", str(bad)], f"{bad}:4:", "YAML")


def test_nested_key_typo_names_the_closest_key(capsys):
    line = one_error(capsys, ["describe", "tiny", "fusion.bca.ratoi=0.25"], "fusion.bca.ratoi", "ratio")
    assert "closest" in line


def test_unknown_expert_kwarg_names_the_key_path(capsys):
    one_error(capsys, ["describe", "tiny", "experts.spatial.img_sze=32"], "experts.spatial.img_sze", "img_size")
    with pytest.raises(RecipeError, match=r"experts\.spatial\.img_sze.*closest valid keys: img_size"):
        fusionkit.build("tiny", ["experts.spatial.img_sze=32"])


@pytest.mark.parametrize("override, names", [
    ("fusion.bca.ratoi=0.25", ["fusion.bca.ratoi", "ratio"]),
    ("experts.temporal.img_sze=32", ["experts.temporal.img_sze", "img_size"]),
    ("heads.noun.dropot=0.1", ["heads.noun.dropot", "dropout"]),
    ("trainable.unfrez=[x]", ["trainable.unfrez", "unfreeze"]),
    ("experts.spatial.img_sze=32", ["experts.spatial.img_sze"]),  # timm_vit: **kwargs to timm, built on meta
])
def test_the_whole_recipe_is_checked_before_any_module_is_built(monkeypatch, override, names):
    """A typo anywhere (an operator, a head, the trainable section, a later expert, a key a **kwargs
    factory passes on to timm) fails before the first real module is built: only meta-device builds."""
    real = []
    build = fusionkit.recipes._build

    def spy(path, fn, **kwargs):
        if not hasattr(fn, "__wrapped__") and fn.__name__ != "check_options":  # dry builds are wrapped
            real.append(path)
        return build(path, fn, **kwargs)

    monkeypatch.setattr(fusionkit.recipes, "_build", spy)
    with pytest.raises(RecipeError) as err:
        fusionkit.build("tiny", [override])
    assert real == [] and all(name in str(err.value) for name in names), (real, str(err.value))


def test_train_checks_the_recipe_before_its_data(capsys):
    # cast's EK100 manifests are not here: the recipe's typo is still the error reported
    one_error(capsys, ["train", "cast", "experts.temporal.img_sze=224"], "experts.temporal.img_sze", "img_size")


@pytest.mark.parametrize("overrides, key", [
    (["fusion.bca.mode=full", "fusion.bca.ratio=0.25"], "'ratio' = 0.25 has no effect with mode 'full'"),
    (["fusion.bca.mode=full_adapter", "fusion.bca.bottleneck_dim=8"], "'bottleneck_dim' = 8 has no effect"),
    (["fusion.bca.adapter_ratio=0.5"], "'adapter_ratio' = 0.5 has no effect with mode 'bottleneck'"),
])
def test_options_the_mode_ignores_are_rejected(capsys, overrides, key):
    one_error(capsys, ["describe", "tiny", *overrides], "fusion.bca", key)
    # the default value, as cast.yaml writes it, is no request: the one-line swap to mode=full stays valid
    assert fusionkit.build("tiny", ["fusion.bca.mode=full", "fusion.bca.ratio=0.5"]) is not None


def test_missing_and_junk_checkpoint(capsys, tmp_path):
    missing = tmp_path / "nope.safetensors"
    one_error(capsys, ["eval", "tiny", "--checkpoint", str(missing)], str(missing), "does not exist")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(256))
    one_error(capsys, ["eval", "tiny", "--checkpoint", str(junk)], str(junk), "cannot read checkpoint")
    one_error(capsys, ["eval", "tiny", "--checkpoint", str(tmp_path)], str(tmp_path), "is a directory")


def test_offline_hub_name(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_error(capsys, ["describe", "tiny", "experts.spatial.pretrained=augreg_in21k"], "HF_HUB_OFFLINE",
              "augreg_in21k", "local weight file")


def test_forced_xformers_on_cpu(capsys, monkeypatch):
    monkeypatch.setenv("FUSIONKIT_ATTENTION", "xformers")
    one_error(capsys, ["describe", "tiny"], "xformers", "FUSIONKIT_ATTENTION", "sdpa")


@pytest.mark.parametrize("k", ["-1", "0"])
def test_topk_must_be_positive(capsys, clip, k):
    one_error(capsys, ["predict", "tiny", "--video", str(clip), "--topk", k], "--topk", f"got {k}")


@pytest.mark.parametrize("value", ["abc", "0", "-0.5"])
def test_bca_ratio_must_be_a_positive_number(capsys, value):
    line = one_error(capsys, ["describe", "tiny", f"fusion.bca.ratio={value}"], "bca", "ratio must be a number > 0")
    assert "__round__" not in line and "ZeroDivision" not in line


def test_directory_as_video(capsys, tmp_path):
    one_error(capsys, ["predict", "tiny", "--video", str(tmp_path)], str(tmp_path), "is a directory")
    one_error(capsys, ["predict", "tiny", "--video", str(tmp_path / "none.mp4")], "no such file")


def test_junk_tensor_file_as_video(capsys, tmp_path):
    junk = tmp_path / "clip.safetensors"
    junk.write_bytes(os.urandom(64))
    one_error(capsys, ["predict", "tiny", "--video", str(junk)], str(junk), "cannot read")


def test_bom_in_csv_header_is_not_a_phantom_head(tmp_path):
    path = tmp_path / "train.csv"
    with path.open("w", newline="", encoding="utf-8-sig") as f:  # writes the BOM, as spreadsheets do
        writer = csv.writer(f)
        writer.writerow(["path", "verb"])
        writer.writerows([["a.mp4", "1"], ["b.mp4", "0"]])
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    manifest = Manifest(path)
    assert manifest.heads == {"verb": "verb"}
    assert [item.path for item in manifest.items] == [str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")]
    assert [item.labels["verb"] for item in manifest.items] == [1, 0]


def manifest_recipe(tmp_path, noun_labels: list[int]) -> str:
    """recipes/tiny.yaml on a manifest (the media files need not exist: the checks run first)."""
    from omegaconf import OmegaConf

    rows = tmp_path / "train.csv"
    rows.write_text("path,verb,noun\n" + "".join(f"c{i}.mp4,{i % 4},{n}\n" for i, n in enumerate(noun_labels)))
    recipe = fusionkit.load_recipe("tiny")
    data = {"type": "manifest", "path": str(rows), "frames": 4, "size": 32}
    recipe["data"] = {"train": {**data, "train": True}}
    path = tmp_path / "tiny_manifest.yaml"
    OmegaConf.save(OmegaConf.create(recipe), path)
    return str(path)


def test_out_of_range_label_names_the_manifest_row(capsys, tmp_path):
    recipe = manifest_recipe(tmp_path, [0, 1, 2, 7, 3, 4, 0, 1])  # tiny's noun head has 5 classes
    one_error(capsys, ["train", recipe, "train.batch_size=4", "--output-dir", str(tmp_path / "run")],
              "train.csv, row 3", "noun label 7", "5 classes", "heads.noun")


def test_overrides_anywhere_on_the_command_line():
    parser = build_parser()
    args = parse_args(parser, ["eval", "tiny", "a.b=1", "--checkpoint", "C", "train.seed=1", "--json", "x=2"])
    assert args.recipe == "tiny" and args.checkpoint == "C" and args.json
    assert args.overrides == ["a.b=1", "train.seed=1", "x=2"]
    for argv in (["train", "tiny", "--output-dir", "D", "train.epochs=1"],
                 ["predict", "tiny", "--video", "v.mp4", "train.seed=3"],
                 ["describe", "tiny", "--json", "fusion.bca.ratio=0.25"]):
        assert parse_args(parser, argv).overrides[-1] == argv[-1]
    with pytest.raises(SystemExit) as exit_info:  # anything else is still an error of the sub-command
        parse_args(parser, ["eval", "tiny", "--checkpoint", "C", "--nope"])
    assert exit_info.value.code == 2


def test_override_after_an_option_reaches_the_recipe(capsys, tmp_path):
    # the typo after --checkpoint is read as an override (and rejected by name) instead of "unrecognized"
    one_error(capsys, ["eval", "tiny", "--checkpoint", str(tmp_path / "c.safetensors"), "train.epoch=1"],
              "train.epoch", "epochs")


def test_debug_shows_the_traceback(capsys, monkeypatch):
    with pytest.raises(RecipeError):
        main(["describe", "tinny", "--debug"])
    monkeypatch.setenv("FUSIONKIT_DEBUG", "1")
    with pytest.raises(FusionkitError):
        main(["describe", "tinny"])


def test_error_families_keep_their_builtin_bases():
    from fusionkit.attention.kernels import BackendError, UnknownBackendError
    from fusionkit.converters import ConvertError
    from fusionkit.data.decode import DecodeError
    from fusionkit.data.manifest import ManifestError
    from fusionkit.engine.checkpoint import CheckpointError, RunDirError
    from fusionkit.engine.trainer import NonFiniteLossError
    from fusionkit.experts.pretrained import PretrainedError

    for cls, base in ((RecipeError, ValueError), (ManifestError, ValueError), (ConvertError, ValueError),
                      (UnknownBackendError, ValueError), (BackendError, RuntimeError), (DecodeError, RuntimeError),
                      (CheckpointError, RuntimeError), (RunDirError, RuntimeError), (PretrainedError, RuntimeError),
                      (NonFiniteLossError, FloatingPointError)):
        assert issubclass(cls, FusionkitError) and issubclass(cls, base), cls


def test_convert_bad_inputs_take_the_one_error_path(capsys, tmp_path):
    # missing file, junk bytes, unknown converter, a state dict of the wrong layout (a multi-line
    # message listing keys): each one line, exit 2, and no output file left behind
    out = tmp_path / "out.safetensors"
    missing = tmp_path / "nope.pth"
    one_error(capsys, ["convert", "cast-official", str(missing), str(out)], str(missing), "does not exist")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(256))
    one_error(capsys, ["convert", "cast-official", str(junk), str(out)], str(junk), "cannot read weights")
    one_error(capsys, ["convert", "cast-offical", str(junk), str(out)], "unknown converter 'cast-offical'",
              "cast-official")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"head_verb.weight": torch.zeros(2, 2), "head_noun.weight": torch.zeros(2, 2),
               "blocks.0.clip_ln_1.weight": torch.zeros(2), "blocks.0.clip_ln_1.wieght": torch.zeros(2)},
              str(wrong))
    line = one_error(capsys, ["convert", "cast-official", str(wrong), str(out)], "cast-official",
                     "missing keys", "blocks.0.clip_ln_1.wieght")
    assert "unknown keys" in line and "; " in line   # the key listing, joined onto one line
    assert not out.exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fusionkit {fusionkit.__version__}" == "fusionkit 0.1.0"

"""Registries: decorator registration, unknown-name errors, plugins, `fusionkit list`."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

import fusionkit
from fusionkit.registry import EXPERTS, REGISTRIES, Registry, UnknownNameError, load_plugins


def test_builtins_registered_on_import():
    assert {"timm_vit", "timm_cnn"} <= set(EXPERTS.names())
    assert set(fusionkit.KERNELS.names()) == {"eager", "sdpa", "xformers"}
    assert {"global", "space", "time", "local", "ragged"} <= set(fusionkit.WINDOWS.names())
    assert set(REGISTRIES) == {"experts", "fusions", "heads", "frontends", "datasets", "kernels", "windows", "modalities"}
    assert {"video", "audio", "motion", "iframe", "residual"} <= set(fusionkit.MODALITIES.names())


def test_unknown_name_is_one_line_with_closest_names():
    with pytest.raises(UnknownNameError) as err:
        EXPERTS.get("timm_vitt")
    msg = str(err.value)
    assert "\n" not in msg
    assert "'experts'" in msg and "'timm_vitt'" in msg
    assert msg.split("closest valid names: ")[1].startswith("timm_vit")


def test_register_build_and_duplicate():
    reg: Registry = Registry("things", "test things")

    @reg.register("square")
    def square(x: int = 3) -> int:
        """Square a number.

        Longer text that is not shown."""
        return x * x

    assert reg.build("square", x=4) == 16
    assert reg.entries()[0].description == "Square a number."
    with pytest.raises(ValueError, match="already registered"):
        reg.register("square")(lambda: 0)


def test_plugin_entry_point(tmp_path, monkeypatch):
    (tmp_path / "fk_demo_plugin.py").write_text(textwrap.dedent('''
        from fusionkit.registry import EXPERTS

        @EXPERTS.register("plugin_expert")
        class PluginExpert:
            """An expert from a third-party package."""
    '''))
    dist = tmp_path / "fk_demo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fk-demo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fusionkit.plugins]\ndemo = fk_demo_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "demo" in load_plugins(force=True)
        assert "plugin_expert" in EXPERTS
        assert EXPERTS.get("plugin_expert").__doc__.startswith("An expert from")
    finally:
        EXPERTS._entries.pop("plugin_expert", None)
        sys.modules.pop("fk_demo_plugin", None)


def test_broken_plugin_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    dist = tmp_path / "fk_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fk-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fusionkit.plugins]\nbroken = fk_no_such_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "broken" not in load_plugins(force=True)
    assert "fk_no_such_module" in caplog.text


def test_cli_list_json(capsys):
    # in-process (a fresh interpreter's import warnings: test_attention_kernels.test_xformers_import_is_silent)
    from fusionkit.cli import main

    capsys.readouterr()
    assert main(["list", "--json"]) == 0
    out = capsys.readouterr()
    data = json.loads(out.out)
    assert set(data) == set(REGISTRIES)
    assert "timm_vit" in data["experts"] and "sdpa" in data["kernels"]
    assert "xformers" not in out.err.lower(), out.err


def test_cli_list_table(capsys):
    from fusionkit.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "timm_vit" in out and "Any timm ViT" in out and "kernels" in out

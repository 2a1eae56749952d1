"""fusionkit as a user installs it: a built wheel (and an editable install) in a throwaway venv.

The wheel is built offline from a copy of the working tree (``pip wheel --no-deps --no-build-isolation``,
so nothing is downloaded and the checkout gets no build/ folder), installed with ``--no-deps`` into a
venv made with ``--system-site-packages`` that reuses the stack of the interpreter running the tests:
when that interpreter is itself a venv (``.venv``), whose packages ``--system-site-packages`` cannot see,
a ``.pth`` file adds its site-packages after the throwaway venv's own. Every command runs from a
temporary directory outside the repository, and the test checks that ``fusionkit`` is imported from the
throwaway venv, not from the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "fusionkit", "recipes"]  # what the build reads
TINY_PARAMS = 84_585  # tests/test_recipes.py
CAST_PARAMS = 216_808_333

def run(cmd: list[str], cwd: Path, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FUSIONKIT_RECIPES", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", NO_COLOR="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} (in {cwd}) exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def make_venv(path: Path) -> Path:
    """A venv without pip that sees the running interpreter's packages; returns its python."""
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)], cwd=path.parent)
    python = path / "bin" / "python"
    if sys.prefix != sys.base_prefix:  # running from a venv: --system-site-packages sees only its base
        own = run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], cwd=path.parent).strip()
        (Path(own) / "_fusionkit_test_stack.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def pip_install(python: Path, *args: str, cwd: Path) -> None:
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", *args], cwd=cwd)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of what the build reads from the working tree."""
    dst = tmp_path_factory.mktemp("src") / "fusionkit-src"
    dst.mkdir()
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst / name)
    return dst


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out),
         str(source)], cwd=out)
    (whl,) = out.glob("fusionkit-*.whl")
    return whl


def test_wheel_contents(wheel):  # building the wheel: about 2 s
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"fusionkit/py.typed", "fusionkit/_recipes/tiny.yaml", "fusionkit/_recipes/cast.yaml",
            "fusionkit/_recipes/binding/bca.yaml", "fusionkit/_recipes/ablations/binding.yaml"} <= names
    shipped = {n.removeprefix("fusionkit/_recipes/") for n in names if n.startswith("fusionkit/_recipes/")}
    assert {p.relative_to(ROOT / "recipes").as_posix() for p in (ROOT / "recipes").rglob("*.yaml")} <= shipped
    dist_info = "-".join(wheel.name.split("-")[:2])  # fusionkit-0.1.0
    meta = zipfile.ZipFile(wheel).read(f"{dist_info}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta and "License-File: LICENSE" in meta
    assert "Description-Content-Type: text/markdown" in meta and "# fusionkit" in meta
    assert f"{dist_info}.dist-info/licenses/LICENSE" in names
    assert "Requires-Dist: torch<3,>=2.6" in meta and "Requires-Dist: xformers>=0.0.29; extra == \"xformers\"" in meta


@pytest.mark.slow  # a venv and three subprocesses that import torch, build CAST and train: 29 s on 2 cores
def test_installed_wheel_runs_outside_the_repository(wheel, tmp_path):
    python = make_venv(tmp_path / "venv")
    pip_install(python, str(wheel), cwd=tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    site_dir = (tmp_path / "venv").resolve()

    code = ("import json, fusionkit, fusionkit.recipes as r\n"
            "model = fusionkit.build('cast')\n"
            "print(json.dumps({'file': fusionkit.__file__, 'recipes': str(r.RECIPE_DIR), 'names': fusionkit.list_recipes(),"
            " 'params': sum(p.numel() for p in model.parameters())}))\n")
    info = json.loads(run([str(python), "-c", code], cwd=work).splitlines()[-1])
    assert Path(info["file"]).resolve().is_relative_to(site_dir), info["file"]  # the wheel's copy, not the checkout
    assert Path(info["recipes"]).resolve() == site_dir / "lib" / "python3.11" / "site-packages" / "fusionkit" / "_recipes"
    assert {"cast", "tiny", "binding/bca"} <= set(info["names"])
    assert info["params"] == CAST_PARAMS

    fusionkit_cli = str(tmp_path / "venv" / "bin" / "fusionkit")
    described = json.loads(run([fusionkit_cli, "describe", "tiny", "--json"], cwd=work))
    assert described["params_total"] == TINY_PARAMS

    run([fusionkit_cli, "train", "tiny", "--output-dir", "run", "--no-progress", "train.epochs=1",
         "data.train.size=16", "data.val.size=8", "train.batch_size=8", "train.eval_every=0"], cwd=work)
    assert sorted(p.name for p in (work / "run").glob("*.safetensors")), sorted((work / "run").iterdir())


@pytest.mark.slow  # an editable build, a venv and a subprocess: 8 s
def test_editable_install_reads_the_recipes_folder(source, tmp_path):
    """``pip install -e`` (what ``make`` does) maps ``fusionkit._recipes`` onto the checkout's recipes/."""
    python = make_venv(tmp_path / "venv")
    pip_install(python, "--no-build-isolation", "-e", str(source), cwd=tmp_path)
    code = ("import json, importlib.resources, fusionkit, fusionkit.recipes as r\n"
            "print(json.dumps({'file': fusionkit.__file__, 'resources': str(importlib.resources.files('fusionkit._recipes')),"
            " 'bca': r.load_recipe('binding/bca')['fusion']['bca']['type'], 'path': str(r.recipe_path('binding/bca'))}))\n")
    info = json.loads(run([str(python), "-c", code], cwd=tmp_path).splitlines()[-1])
    assert Path(info["file"]) == source / "fusionkit" / "__init__.py"
    assert Path(info["resources"]) == source / "recipes"  # through importlib.resources, not the fallback
    assert info["bca"] == "bca" and Path(info["path"]) == source / "recipes" / "binding" / "bca.yaml"

"""The code blocks of README.md, CONTRIBUTING.md and docs/*.md run as written (offline, small).

The convention (CONTRIBUTING.md, "Code blocks in the docs") is the fence's info string:

* ``python``: executed here, from the repository root, in a fresh namespace;
* ``bash``: every line is a ``fusionkit`` (or ``.venv/bin/fusionkit``) command, run here through
  ``fusionkit.cli.main`` in an empty temporary directory; each must exit with status 0;
* ``yaml`` / ``toml`` / ``csv``: parsed here (valid syntax, rectangular CSV);
* ``<language> slow``: as above, in the slow tests only (``make test-all``);
* ``<language> template``: shown, never run (placeholders, your data, GPUs, minutes of compute);
* ``text``: not code (a directory tree, a diagram, an error message).

A block without an info string, or with any other, fails :func:`test_every_block_is_run_or_marked`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import fusionkit
from fusionkit import registry
from fusionkit.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"python", "bash"}
PARSE = {"yaml", "toml", "csv"}
FLAGS = {"template", "slow"}
FUSIONKIT = re.compile(r"^(?:\.venv/bin/)?fusionkit$")

# what a file's python blocks must print (beside running without error): each text appears in a comment
# of the block that prints it
PRINTS = {
    "docs/ablate.md": ["{'spatial': 4, 'temporal': 4, 'audio': 4}", "0.5"],
    "README.md": ["TokenLayout(t=8, h=4, w=4, extras=1, per_frame_extras=True)"],
    "docs/training-on-your-data.md": ["P01_01_0,P01/videos/P01_01.MP4,00:00:00.14,00:00:03.37,3,3",
                                      "P01_01_0,P01/videos/P01_01.MP4,00:00:02.466,00:00:05.315,4",
                                      "abseiling/--Y25TG5sDk_000002_000012.mp4,abseiling"],
}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence
    lang: str
    flags: frozenset[str]
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file (indented fences of list items included)."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,})(.*)$", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.groups()
        close = re.compile(rf"^\s*{fence}\s*$")
        j, body = i + 1, []
        while j < len(lines) and not close.match(lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        assert j < len(lines), f"{path}:{i + 1}: unclosed code block"
        words = info.split()
        blocks.append(Block(path, i + 1, words[0] if words else "", frozenset(words[1:]), "\n".join(body) + "\n"))
        i = j + 1
    return blocks


BLOCKS = [b for path in DOCS for b in fenced_blocks(path)]
CHECKED = [b for b in BLOCKS if b.lang in RUN | PARSE and "template" not in b.flags]


def params(lang: set[str]) -> list:
    return [pytest.param(b, id=b.name, marks=[pytest.mark.slow] if "slow" in b.flags else [])
            for b in CHECKED if b.lang in lang]


@pytest.fixture
def registries():
    """Registries as they were before the test: a block may register an example expert / operator."""
    saved = {name: dict(reg._entries) for name, reg in vars(registry).items() if isinstance(reg, registry.Registry)}
    yield
    for name, entries in saved.items():
        reg = getattr(registry, name)
        reg._entries.clear()
        reg._entries.update(entries)


def run_python(block: Block) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.code, block.name, "exec"), {"__name__": "__docs__"})  # noqa: S102 - the docs' own code
    return out.getvalue()


def test_every_block_is_run_or_marked():
    assert len(BLOCKS) > 20 and len(CHECKED) > 8
    for b in BLOCKS:
        assert b.lang in RUN | PARSE | {"text"} and b.flags <= FLAGS, \
            f"{b.name}: info string {' '.join([b.lang, *b.flags])!r}; use python / bash / yaml / toml / csv " \
            "(run or parsed by tests/test_docs.py), '<language> template' or text (CONTRIBUTING.md)"
        assert not (b.lang == "text" and b.flags), b.name


@pytest.mark.parametrize("block", params({"python"}))
def test_python_block_runs(block, monkeypatch, registries):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)
    printed = run_python(block)
    for text in PRINTS.get(str(block.path.relative_to(ROOT)), []):
        if text in block.code:  # the block shows it in a comment: it must print it
            assert text in printed, (block.name, text, printed)


def test_expected_prints_are_shown_by_a_block():
    for doc, texts in PRINTS.items():
        for text in texts:
            assert any(text in b.code for b in CHECKED if b.lang == "python" and str(b.path.relative_to(ROOT)) == doc), \
                (doc, text)


def commands(block: Block) -> list[list[str]]:
    """The block's commands (backslash continuations joined, comments dropped), each as argv."""
    out = []
    for line in block.code.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            assert FUSIONKIT.match(argv[0]), f"{block.name}: {argv[0]!r} is not a fusionkit command; " \
                "mark the block 'bash template'"
            out.append(argv[1:])
    assert out, block.name
    return out


@pytest.mark.parametrize("block", params({"bash"}))
def test_shell_block_runs(block, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    for argv in commands(block):
        assert main(argv) == 0, (block.name, argv, capsys.readouterr().err)


@pytest.mark.parametrize("block", params(PARSE))
def test_data_block_parses(block):
    if block.lang == "yaml":
        assert isinstance(yaml.safe_load(block.code), dict), block.name
    elif block.lang == "toml":
        assert tomllib.loads(block.code), block.name
    else:
        rows = list(csv.reader(io.StringIO(block.code)))
        assert len(rows) > 1 and len({len(r) for r in rows}) == 1, block.name


def test_contributing_operator_plugs_into_a_recipe(registries):
    """The example operator of CONTRIBUTING.md, registered by its own block, in the recipe of step 3."""
    import torch

    from fusionkit.registry import FUSIONS

    (block,) = [b for b in CHECKED if b.path.name == "CONTRIBUTING.md" and "FUSIONS.register" in b.code]
    run_python(block)
    model = fusionkit.build("tiny", ["fusion.bca=null",
                                     "fusion.mine={type: my_op, experts: [spatial, temporal], steps: '0:2'}"])
    assert {type(op).__name__ for op in model.fusions["mine"].modules() if isinstance(op, FUSIONS.get("my_op"))}
    torch.manual_seed(0)
    batch = {m: torch.randn(2, *s) for m, s in model.input_shapes.items()}
    with torch.no_grad():
        tokens = model.eval().forward_tokens(batch)
        for e, expert in model.experts.items():  # zero-initialised: the identity at init
            assert torch.equal(tokens[e].x, expert(batch[expert.modality]).x), e

"""The Python code blocks of docs/ablate.md run as written (offline, small)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "ablate.md"


def test_python_blocks_of_the_ablation_doc_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), {})  # noqa: S102 - the documentation's own example
    out = capsys.readouterr().out
    assert "{'spatial': 4, 'temporal': 4, 'audio': 4}" in out and "0.5" in out

"""Shared by the benchmark scripts: write one section of a markdown report, replacing its old version."""

from __future__ import annotations

from pathlib import Path

HEADER = ("# Benchmarks\n\nTimings are compared only within one run (ratios in the last column); the scripts in\n"
          "`benchmarks/` run outside the test suite and rewrite their own section of this file.\n")


def write_section(out: str | Path, heading: str, section: str) -> Path:
    """Put ``section`` (starting with ``heading``) into ``out``, replacing a section of that heading."""
    out = Path(out)
    text = out.read_text() if out.exists() else HEADER
    if heading in text:
        start = text.index(heading)
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end != -1 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    out.write_text(text)
    return out

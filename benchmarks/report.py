"""Shared by the benchmark scripts: write one section of a markdown report, replacing its old version."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

HEADER = ("# Benchmarks\n\nTimings are compared only within one run (ratios in the last column); the scripts in\n"
          "`benchmarks/` run outside the test suite and rewrite their own section of this file.\n")


def device_label(device: torch.device) -> str:
    """The GPU's name, or the CPU architecture and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(r) + " |" for r in rows)])


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

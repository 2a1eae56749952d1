"""docs/reference.md is what the code's signatures and defaults say (regenerate: python -m fusionkit.reference
--write docs/reference.md)."""

from pathlib import Path

from fusionkit import reference
from fusionkit.engine.config import TRAIN_DEFAULTS

DOC = Path(__file__).resolve().parent.parent / "docs" / "reference.md"


def test_the_committed_reference_equals_the_generated_one():
    assert DOC.read_text() == reference.render(), \
        "docs/reference.md is stale: run python -m fusionkit.reference --write docs/reference.md"


def test_the_reference_lists_signatures_and_engine_defaults():
    text = reference.render()
    assert "### `type: bca`" in text and "### `type: timm_vit`" in text and "### `type: manifest`" in text
    assert f"| `train.epochs` | `{TRAIN_DEFAULTS['epochs']!r}` |" in text
    assert "| `train.distributed.find_unused_parameters` | `'auto'` |" in text
    assert " at 0x" not in text
    bca = text.split("### `type: bca`")[1].split("### ")[0]
    assert "| `ratio` |" in bca and "| `experts` |" not in bca  # graph keys are not options

"""``fusionkit export``: a torch.export program of a recipe's model (checkpoint loaded) that, loaded
back, gives the eager model's logits for any batch size; its refusals end in one ``error:`` line."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import fusionkit  # noqa: F401 - registers the built-ins
from fusionkit.cli import main
from fusionkit.engine.checkpoint import model_meta, model_tensors, save_tensors
from fusionkit.engine.evaluate import model_for
from fusionkit.engine.export import ExportError, example_inputs, run_export, trace
from fusionkit.recipes import load_recipe

CPU = torch.device("cpu")
SMALL = ["experts.spatial.depth=1", "experts.temporal.depth=1"]  # tiny with one layer (and B-CA) each: 2x faster


def one_error(capsys, argv: list[str], *texts: str) -> str:
    """Run ``fusionkit argv``; assert exit 2 and one ``error:`` line on stderr holding each of ``texts``."""
    capsys.readouterr()
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    for text in texts:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.fixture
def trained(tmp_path):
    """A tiny checkpoint whose trainable tensors (B-CA up-projections included) are non-zero."""
    cfg = load_recipe("tiny", SMALL)
    model, _ = model_for(cfg, None, CPU)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    path = tmp_path / "tiny.safetensors"
    save_tensors(path, model_tensors(model), {"fusionkit": model_meta(model, cfg, 0, trainable_only=True)})
    return path


def test_export_tiny_replaces_out_and_reloads_equal_to_eager(tmp_path, capsys, trained):
    out = tmp_path / "tiny.pt2"
    out.write_bytes(b"an older export")
    argv = ["export", "tiny", "--checkpoint", str(trained), "--format", "torch-export", str(out), "--overwrite", *SMALL]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr()
    assert f"wrote {out} (torch-export; inputs video (B, 3, 4, 32, 32), batch B dynamic)" in printed.out
    assert "max abs diff" in printed.out and printed.err == ""
    program = torch.export.load(out).module()
    eager, _ = model_for(load_recipe("tiny", SMALL), str(trained), CPU)
    untrained, _ = model_for(load_recipe("tiny", SMALL), None, CPU)
    torch.manual_seed(2)
    inputs = example_inputs(eager, 4)  # traced with a batch of 2: the batch dimension is dynamic
    with torch.no_grad():
        want, got, fresh = eager(inputs), program(inputs), untrained(inputs)
    assert set(got) == {"verb", "noun"}
    for head in want:
        assert got[head].shape == (4, eager.heads[head].num_classes)
        torch.testing.assert_close(got[head], want[head], atol=1e-5, rtol=0)
        assert not torch.allclose(got[head], fresh[head]), head  # the checkpoint's weights were exported


def test_onnx_without_its_packages_names_them(tmp_path, capsys):
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxscript") \
            and importlib.util.find_spec("onnxruntime"):
        pytest.skip("the ONNX packages are installed")
    out = tmp_path / "tiny.onnx"
    one_error(capsys, ["export", "tiny", "--format", "onnx", str(out)], "--format onnx needs", "pip install onnx")
    assert not out.exists()


def test_existing_out_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "tiny.pt2"
    out.write_bytes(b"an older export")
    one_error(capsys, ["export", "tiny", "--format", "torch-export", str(out)], str(out), "--overwrite")
    assert out.read_bytes() == b"an older export"


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    out, missing = tmp_path / "tiny.pt2", tmp_path / "nope.safetensors"
    one_error(capsys, ["export", "tiny", "--checkpoint", str(missing), "--format", "torch-export", str(out)],
              f"checkpoint {missing} does not exist")
    assert not out.exists()


def test_override_where_out_belongs_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:  # argparse fills OUT with the first word after RECIPE
        main(["export", "tiny", "fusion.bca.ratio=0.25", "--format", "torch-export", str(tmp_path / "tiny.pt2")])
    assert stop.value.code == 2
    assert "argument OUT: 'fusion.bca.ratio=0.25' is a key=value override; give OUT before any override" \
        in capsys.readouterr().err


def test_untraceable_model_is_one_export_error(capsys):
    class DataDependent(torch.nn.Module):
        def forward(self, batch):
            x = batch["video"]
            return {"head": x if bool(x.sum() > 0) else -x}

    with pytest.raises(ExportError, match=r"^torch.export cannot trace this model: GuardOnDataDependentSymNode: "
                                          r"Could not guard on data-dependent expression [^;]*$"):
        trace(DataDependent(), {"video": torch.randn(2, 3)})
    assert capsys.readouterr().err == ""  # torch's partial graph is not printed


RAGGED_MMVIT_IV = ["fusion.mmvit.variant=IV", "fusion.mmvit.window_frames=3", "fusion.mmvit.window_size=[3,3]"]


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "overrides"), [("binding/bca", []), ("binding/lavish", []),
                                                   ("binding/mmvit_merged", RAGGED_MMVIT_IV)],
                         ids=["bca", "lavish", "mmvit_iv_ragged"])
def test_binding_recipes_export(tmp_path, recipe, overrides):
    result = run_export(recipe, tmp_path / "model.pt2", overrides=overrides)
    assert result.max_abs_diff <= 1e-5
    model, _ = model_for(load_recipe(recipe, overrides), None, CPU)
    inputs = example_inputs(model, 1)
    with torch.no_grad():
        want, got = model(inputs), torch.export.load(result.out).module()(inputs)
    assert set(got) == set(model.heads)
    for head in want:
        torch.testing.assert_close(got[head], want[head], atol=1e-5, rtol=0)

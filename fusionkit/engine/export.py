"""``fusionkit export RECIPE [--checkpoint C] --format {torch-export,onnx} OUT [key=value ...] [--overwrite]``.

Traces the recipe's model (eval mode, on the CPU, with the SDPA attention kernel) with
:func:`torch.export.export` on standard-normal inputs of ``model.input_shapes`` for the modalities
its experts read, the batch dimension dynamic (``torch.export.Dim("batch")``). The program is
serialised, loaded back from those bytes and compared with the eager model on a fresh random batch
of another size; only when the largest absolute difference of any head's logits is at most
:data:`TOLERANCE` is ``OUT`` written (a temporary file and a rename), so a failed export never
leaves a file behind nor replaces an existing one. An existing ``OUT`` needs ``--overwrite``.

* ``torch-export``: :func:`torch.export.save` (a ``.pt2`` file); the tested format. Load it with
  ``torch.export.load(OUT).module()`` and call it as the model: ``{modality: (B, ...)}`` →
  ``{head: (B, classes)}``.
* ``onnx``: the same exported program converted by ``torch.onnx.export(..., dynamo=True)``, checked
  through onnxruntime; needs :data:`ONNX_PACKAGES`, which fusionkit does not install (without them
  the command ends in one line naming them, exit status 2). Not tested by fusionkit's suite.

``--checkpoint`` is optional: without it the heads and fusion operators keep their random
initial weights (a warning says so), which is enough to check that a recipe exports.

Tracing runs one eager forward first: window plans (:mod:`fusionkit.attention.windows`) are cached
per layout and must hold concrete tensors, not the tracer's, when the exporter reaches them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fusionkit.errors import FusionkitError, UsageError, one_line

FORMATS = ("torch-export", "onnx")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
TOLERANCE = 1e-4
EXAMPLE_BATCH = 2  # traced with this batch size ...
CHECK_BATCH = 3  # ... and checked with another, which shows that the batch dimension is dynamic

Run = Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]]


class ExportError(FusionkitError, RuntimeError):
    """A model that torch.export (or the ONNX converter) cannot trace, or an exported program that
    does not match the eager model."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`run_export` wrote: the file, its format, the input shapes (``"B"`` = dynamic batch)
    and the largest absolute difference to the eager model."""

    out: Path
    format: str
    inputs: dict[str, tuple[int | str, ...]]
    max_abs_diff: float


def check_target(out: str | Path, fmt: str, overwrite: bool = False) -> Path:
    """``out`` as a path once ``fmt`` can be written here and ``out`` may be (re)written."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None] if fmt == "onnx" else []
    if missing:
        raise UsageError(f"--format onnx needs {', '.join(missing)}, not installed here: "
                         f"pip install {' '.join(ONNX_PACKAGES)} (or use --format torch-export)")
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"OUT {path} is a directory; name the file to write (e.g. {path / 'model.pt2'})")
    if path.exists() and not overwrite:
        raise UsageError(f"OUT {path} already exists; pass --overwrite to replace it")
    return path


def example_inputs(model: nn.Module, batch: int) -> dict[str, Tensor]:
    """Standard-normal ``{modality: (batch, *model.input_shapes[modality])}`` for the modalities its experts read."""
    read = {expert.modality for expert in model.experts.values()}
    return {m: torch.randn(batch, *shape) for m, shape in model.input_shapes.items() if m in read}


def trace(model: nn.Module, inputs: Mapping[str, Tensor]) -> torch.export.ExportedProgram:
    """``torch.export.export(model, (inputs,))`` with a dynamic batch dimension (grad off). What torch
    prints meanwhile is shown after a success; after a failure (the partial graph) only the error is."""
    batch = torch.export.Dim("batch", min=1)
    printed = io.StringIO()
    with torch.no_grad():
        model(inputs)  # fills the window-plan caches with concrete tensors (module docstring)
        try:
            with contextlib.redirect_stderr(printed):
                program = torch.export.export(model, (dict(inputs),),
                                              dynamic_shapes={"batch": {m: {0: batch} for m in inputs}})
        except Exception as err:  # noqa: BLE001 - any tracing failure, re-raised as one line
            first = str(err).split("\n\n")[0]  # torch's explanation follows a blank line
            raise ExportError(f"torch.export cannot trace this model: {type(err).__name__}: {one_line(first)}") from err
    sys.stderr.write(printed.getvalue())
    return program


def max_abs_diff(model: nn.Module, run: Run, inputs: Mapping[str, Tensor]) -> float:
    """The largest ``|eager - exported|`` over every head's logits for ``inputs``."""
    with torch.no_grad():
        want, got = model(inputs), run(inputs)
    return max(float((want[head] - got[head]).abs().max()) for head in want)


def torch_export_bytes(program: torch.export.ExportedProgram) -> tuple[bytes, Run]:
    """The ``.pt2`` bytes of ``program`` and the module loaded back from them."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    data = buffer.getvalue()
    return data, torch.export.load(io.BytesIO(data)).module()


def onnx_bytes(program: torch.export.ExportedProgram) -> tuple[bytes, Run]:
    """The ONNX model of ``program`` and a runner of it through onnxruntime (outputs in head order)."""
    heads = list(program.call_spec.out_spec.context)
    converted = torch.onnx.export(program, dynamo=True)
    return converted.model_proto.SerializeToString(), lambda x: dict(zip(heads, converted(dict(x))))


WRITERS = {"torch-export": torch_export_bytes, "onnx": onnx_bytes}


def run_export(recipe: Any, out: str | Path, fmt: str = "torch-export", checkpoint: str | None = None,
               overrides: Sequence[str] = (), overwrite: bool = False) -> ExportResult:
    """Export ``recipe``'s model (with ``checkpoint`` loaded) to ``out`` and check it (module docstring)."""
    from fusionkit.attention.kernels import use_backend
    from fusionkit.engine.checkpoint import atomic_write_bytes
    from fusionkit.engine.evaluate import model_for
    from fusionkit.recipes import load_recipe

    path = check_target(out, fmt, overwrite)
    cfg = load_recipe(recipe, list(overrides))
    model, _ = model_for(cfg, checkpoint, torch.device("cpu"))
    with use_backend("sdpa"):
        inputs = example_inputs(model, EXAMPLE_BATCH)
        data, run = WRITERS[fmt](trace(model, inputs))
        diff = max_abs_diff(model, run, example_inputs(model, CHECK_BATCH))
    if not diff <= TOLERANCE:
        raise ExportError(f"the exported program differs from the eager model: max abs diff {diff:.3e} > "
                          f"{TOLERANCE:g}; {path} not written")
    atomic_write_bytes(path, data)
    shapes = {m: ("B", *x.shape[1:]) for m, x in inputs.items()}
    return ExportResult(path, fmt, shapes, diff)


def cmd_export(args: argparse.Namespace) -> int:
    result = run_export(args.recipe, args.out, args.format, args.checkpoint, args.overrides, args.overwrite)
    shapes = ", ".join(f"{m} ({', '.join(map(str, s))})" for m, s in result.inputs.items())
    print(f"wrote {result.out} ({result.format}; inputs {shapes}, batch B dynamic); reloaded: max abs diff "
          f"to the eager model {result.max_abs_diff:.2e} on a batch of {CHECK_BATCH}")
    if args.checkpoint is None:
        print("warning: no --checkpoint: the heads and fusion operators kept their random initial weights",
              file=sys.stderr)
    return 0


def _out_name(value: str) -> str:
    """OUT, which argparse takes from the first word after RECIPE: an override there is an error."""
    if "=" in value:
        raise argparse.ArgumentTypeError(f"{value!r} is a key=value override; give OUT before any override "
                                         "(fusionkit export RECIPE --format FORMAT OUT [key=value ...])")
    return value


def add_command(subparsers: Any) -> list[argparse.ArgumentParser]:
    """Add ``export`` to an ``add_subparsers()`` object."""
    p = subparsers.add_parser("export", help="the recipe's model as a torch.export program (.pt2) or ONNX file",
                              description="Trace the model of a recipe (and checkpoint) with torch.export, dynamic "
                                          "batch, check the reloaded program against the eager model and write it "
                                          "to OUT.")
    p.add_argument("recipe", help="recipe file or name in recipes/ (e.g. cast, tiny)")
    p.add_argument("out", metavar="OUT", type=_out_name, help="file to write (e.g. model.pt2), before any override")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. fusion.bca.ratio=0.25")
    p.add_argument("--format", required=True, choices=FORMATS, help="torch-export (tested) or onnx")
    p.add_argument("--checkpoint", default=None, help="a .safetensors checkpoint (default: random heads and fusion)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_export)
    return [p]

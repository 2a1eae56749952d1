"""``fusionkit bench``: one JSON object with every measured combination, a train step that updates
exactly the trainable parameters, one-line errors, and a markdown report whose sections are replaced
one at a time. No timing assertions: the numbers only have to exist and be positive."""

from __future__ import annotations

import contextlib
import io
import json
import mmap

import pytest
import torch

import fusionkit  # noqa: F401 - registers the built-ins
from fusionkit.cli import main
from fusionkit.engine.bench import (HEADER, MODES, PRECISIONS, Workload, backends, changed_parameters,
                                    markdown_section, measure_interleaved, write_section)
from fusionkit.engine.device import cast_frozen
from fusionkit.trainable import trainable_names

ROW_KEYS = {"median_s", "peak_mem_gb", "backend", "gflops_per_s", "fraction_of_peak"}


@pytest.fixture(scope="module")
def result() -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["bench", "recipes/tiny.yaml", "--reps", "1", "--json"])
    assert code == 0
    return json.loads(out.getvalue())


def test_json_has_the_summary_keys(result):
    for key in ("recipe", "device", "threads", "torch", "batch", "peak_gflops", "rows"):
        assert key in result, key
    assert result["recipe"] == "tiny" and result["batch"] == 1 and result["torch"] == torch.__version__
    assert set(result["peak_gflops"]) == {"fp32", "bf16"} and min(result["peak_gflops"].values()) > 0
    for mode in MODES:
        assert set(result[mode]) == {"fp32", "bf16"}
        for entry in result[mode].values():
            assert ROW_KEYS <= set(entry)


def test_rows_cover_every_backend_that_runs_here(result):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = {(m, p, b) for m in MODES for p, dtype in PRECISIONS.items() for b in backends(device, dtype)}
    plain = [r for r in result["rows"] if not r["levers"]]
    assert {(r["mode"], r["precision"], r["backend"]) for r in plain} == expected and len(plain) == len(expected)
    levers = [(r["mode"], r["precision"], r["levers"]) for r in result["rows"] if r["levers"]]
    assert levers == [("train_step", "fp32", "recompute"), ("train_step", "fp32", "recompute keep_attention"),
                      ("train_step", "bf16", "recompute"), ("train_step", "bf16", "recompute keep_attention"),
                      ("forward", "bf16", "frozen bf16"), ("train_step", "bf16", "frozen bf16"),
                      ("train_step", "bf16", "frozen bf16 + recompute")]
    assert device.type == "cuda" or "xformers" not in {r["backend"] for r in result["rows"]}


def test_summary_is_the_fastest_row_and_numbers_are_positive(result):
    for row in result["rows"]:
        assert row["median_s"] > 0 and row["gflops_per_s"] > 0 and row["fraction_of_peak"] > 0
        assert row["peak_mem_gb"] >= 0 and row["speedup"] > 0
    for mode in MODES:
        for precision, entry in result[mode].items():
            rows = [r for r in result["rows"] if (r["mode"], r["precision"]) == (mode, precision)]
            assert entry["median_s"] == min(r["median_s"] for r in rows)
            assert entry["backend"] in {r["backend"] for r in rows if r["median_s"] == entry["median_s"]}
            assert entry["levers"] in {r["levers"] for r in rows if r["median_s"] == entry["median_s"]}
    baseline = [r for r in result["rows"] if (r["precision"], r["backend"], r["levers"]) == ("fp32", "eager", "")]
    assert [r["speedup"] for r in baseline] == [1.0, 1.0]


def test_train_step_updates_exactly_the_trainable_parameters():
    # without drop-path, and with the noun head reading every spatial token, every trainable parameter
    # gets a gradient by the second step
    work = Workload.build("recipes/tiny.yaml", ["drop_path=0", "heads.noun.pool=avg"])
    trainable = trainable_names(work.model)
    assert trainable and trainable != {n for n, _ in work.model.named_parameters()}
    assert changed_parameters(work) == trainable


def test_optimizer_holds_exactly_the_trainable_parameters():
    work = Workload.build("recipes/tiny.yaml")
    held = {id(p) for group in work.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in work.model.parameters() if p.requires_grad}
    assert changed_parameters(work) <= trainable_names(work.model)  # nothing frozen moves


@pytest.mark.parametrize(("argv", "name"), [
    (["--batch", "0"], "--batch"),
    (["--reps", "0"], "--reps"),
    (["fusion.bca.ratoi=0.5"], "ratoi"),
])
def test_bad_input_is_one_line_and_status_2(capsys, argv, name):
    code = main(["bench", "tiny", *argv, "--json"])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and captured.out == ""
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], captured.err
    assert "Traceback" not in captured.err


def test_unknown_recipe_is_one_line(capsys):
    assert main(["bench", "no_such_recipe"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no_such_recipe" in err


def test_write_section_replaces_one_section_and_keeps_the_others(tmp_path):
    out = tmp_path / "bench.md"
    write_section(out, "## a on X", "## a on X\n\nold a\n")
    write_section(out, "## b on X", "## b on X\n\nb\n")
    write_section(out, "## a on X", "## a on X\n\nnew a\n")
    text = out.read_text()
    assert text.startswith(HEADER)
    assert "old a" not in text and text.count("## a on X") == 1
    assert text.index("new a") < text.index("## b on X") and text.rstrip().endswith("b")


def test_markdown_section_names_recipe_and_device(result, tmp_path):
    heading, section = markdown_section(result)
    assert heading == f"## tiny forward and train step on {result['device']}"
    assert section.startswith(heading) and section.count("\n| ") == 1 + len(result["rows"])
    out = write_section(tmp_path / "bench.md", heading, section)
    assert section in out.read_text()


def test_interleaved_measurement_warms_each_up_then_goes_round_robin():
    calls: list[str] = []
    fns = [lambda name=name: calls.append(name) for name in "abc"]
    measured = measure_interleaved(fns, reps=2, device=torch.device("cpu"))
    assert calls == list("abc") * 3  # one warm-up each, then two rounds of one call each
    assert len(measured) == 3 and all(m.seconds >= 0 and m.peak_gb >= 0 and m.page_faults < 64 for m in measured)


def test_page_faults_count_the_fresh_pages_a_call_touches():
    pages = 4096  # 16 MiB of 4 KiB pages, freshly mapped and written at every call

    def fresh() -> None:
        with mmap.mmap(-1, pages * mmap.PAGESIZE) as m:
            m.madvise(mmap.MADV_NOHUGEPAGE)  # one fault per page even where transparent huge pages are on
            m[::mmap.PAGESIZE] = b"\1" * pages

    (measured,) = measure_interleaved([fresh], reps=3, device=torch.device("cpu"))
    assert pages <= measured.page_faults < 2 * pages


def test_flops_are_counted_alike_under_bf16_and_after_the_frozen_cast():
    work = Workload.build("recipes/tiny.yaml")
    fp32 = work.flops()
    assert fp32["train_step"] > fp32["forward"] > 0
    assert work.flops("bf16") == fp32
    cast_frozen(work.model, "bf16")  # the bench counts last, after its frozen-bf16 rows
    assert work.flops("bf16") == fp32

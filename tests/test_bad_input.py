"""Bad input, end to end: every fault a user can fix is one ``qcal: error:`` line, exit 2 and
nothing written, and the same exact error class from ``calibrate_onnx``; the faults that are
no error (dynamic dims, NaN/Inf by default, zero, constant and empty tensors, an unmatched
wildcard) calibrate with finite positive scales and a note in the report.

The model is tests/convgemm.py's Conv + Gemm (input x float32 [batch, 3, 8, 8], opset 17);
broken variants are written next to the data each case needs.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from convgemm import BATCH, data_batches
from error_lines import assert_one_error_line
from onnx import TensorProto, helper, numpy_helper

from qcal_export import calibrate_onnx
from qcal_export.artifacts.scales import load_scales
from qcal_export.cli import main
from qcal_export.errors import DataError, ModelError, QcalError, RecipeError, ScalesError


@dataclass
class Inputs:
    """What one case runs on: the model, a data path (or None), CLI options and the same
    options as ``calibrate_onnx`` keywords."""

    model: Path
    data: Path | None
    argv: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)


def write_batches(folder: Path, batches: list[dict[str, np.ndarray]]) -> Path:
    folder.mkdir()
    for i, batch in enumerate(batches):
        np.savez(folder / f"batch_{i:02d}.npz", **batch)
    return folder


def edited_model(w: Path, t: Path, name: str, edit: Callable[[onnx.ModelProto], None]) -> Path:
    model = onnx.load(str(w / "model.onnx"))
    edit(model)
    onnx.save(model, str(t / name))
    return t / name


def set_opset(version: int) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        model.opset_import[0].version = version

    return edit


def dangle(model: onnx.ModelProto) -> None:
    model.graph.node[0].input[0] = "nowhere"


def truncated(w: Path, t: Path) -> Inputs:
    raw = (w / "model.onnx").read_bytes()
    (t / "half.onnx").write_bytes(raw[: len(raw) // 2])
    return Inputs(t / "half.onnx", w / "data")


def already_quantized(w: Path, t: Path) -> Inputs:
    """x -> QuantizeLinear -> DequantizeLinear -> MatMul: the output of another quantizer."""
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "zp"),
        numpy_helper.from_array(np.ones((4, 2), np.float32), "w"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], "x_q"),
            helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], "x_dq"),
            helper.make_node("MatMul", ["xd", "w"], ["y"], "mm"),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(t / "qdq.onnx"))
    data = write_batches(t / "qdq-data", [{"x": np.ones((2, 4), np.float32)}])
    return Inputs(t / "qdq.onnx", data)


def bad_data(change: dict, at: int = 2) -> Callable[[Path, Path], Inputs]:
    """The good batches with batch ``at`` changed: input name -> array (None drops it)."""

    def make(w: Path, t: Path) -> Inputs:
        batches = [{"x": x} for x in data_batches(w)]
        for name, value in change.items():
            if value is None:
                del batches[at][name]
            else:
                batches[at][name] = value
        return Inputs(w / "model.onnx", write_batches(t / "bad-data", batches))

    return make


def nan_data(w: Path, t: Path) -> Inputs:
    batches = [{"x": x} for x in data_batches(w)]
    batches[1]["x"][0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    return Inputs(w / "model.onnx", write_batches(t / "nan-data", batches))


def with_nonfinite_error(w: Path, t: Path) -> Inputs:
    inputs = nan_data(w, t)
    flags = ["--nonfinite", "error", "--target", "tensorrt"]
    return Inputs(inputs.model, inputs.data, flags, {"nonfinite": "error", "target": "tensorrt"})


def exclude(name: str) -> Callable[[Path, Path], Inputs]:
    def make(w: Path, t: Path) -> Inputs:
        return Inputs(w / "model.onnx", w / "data", ["--exclude", name], {"exclude": (name,)})

    return make


def override_missing_node(w: Path, t: Path) -> Inputs:
    path = t / "recipe.yaml"
    path.write_text("overrides:\n  - nodes: /fc/Gem\n    weight: {format: int8}\n")
    return Inputs(w / "model.onnx", w / "data", ["--recipe", str(path)])


def scales_of_another_model(w: Path, t: Path) -> Inputs:
    """Scales calibrated on a one-MatMul model, given with the Conv + Gemm model."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"], "mm")],
        "other",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2])],
        [numpy_helper.from_array(np.ones((4, 2), np.float32), "w")],
    )
    other = t / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(other))
    scales = t / "other.safetensors"
    calibrate_onnx(other, [{"a": np.ones((2, 4), np.float32)}], scales=scales)
    return Inputs(w / "model.onnx", None, ["--scales-in", str(scales)], {"scales_in": scales})


# case -> (inputs from (workdir, tmp_path), error class, pattern of the message)
BAD = {
    "truncated-model": (truncated, ModelError, r"half\.onnx is not a readable ONNX model"),
    "checker-fails": (
        lambda w, t: Inputs(edited_model(w, t, "dangling.onnx", dangle), w / "data"),
        ModelError,
        r"dangling\.onnx fails onnx's checker: .*input 'nowhere' of node: name: /conv/Conv "
        r".*\(fix or re-export the model\)$",
    ),
    "opset-too-old": (
        lambda w, t: Inputs(edited_model(w, t, "old.onnx", set_opset(6)), w / "data"),
        ModelError,
        r"old\.onnx uses opset 6, older than 7, the oldest ONNX Runtime loads: re-export",
    ),
    "opset-unknown": (
        lambda w, t: Inputs(edited_model(w, t, "future.onnx", set_opset(99)), w / "data"),
        ModelError,
        r"future\.onnx uses opset 99, newer than \d+, the newest this onnx .* knows: upgrade",
    ),
    "already-quantized": (
        already_quantized,
        ModelError,
        r"model is already quantized \(nodes \['x_q', 'x_dq'\]\.\.\.\): calibrate the float",
    ),
    "data-missing-and-extra-input": (
        bad_data({"x": None, "image": np.zeros((BATCH, 3, 8, 8), np.float32)}),
        DataError,
        r"batch 2: missing input\(s\) \['x'\]; unknown input\(s\) \['image'\] "
        r"\(the model expects \['x'\]\)$",
    ),
    "data-wrong-dtype": (
        bad_data({"x": np.zeros((BATCH, 3, 8, 8), np.float64)}),
        DataError,
        r"batch 2, input 'x': dtype float64, the model expects float32$",
    ),
    "data-wrong-rank": (
        bad_data({"x": np.zeros((3, 8, 8), np.float32)}),
        DataError,
        r"batch 2, input 'x': rank 3 \(shape \(3, 8, 8\)\), the model expects "
        r"x float32\[\?, 3, 8, 8\]$",
    ),
    "fixed-dim-changes-mid-stream": (
        bad_data({"x": np.zeros((BATCH, 3, 9, 9), np.float32)}),
        DataError,
        r"batch 2, input 'x': dim 2 is 9, the model expects x float32\[\?, 3, 8, 8\]$",
    ),
    "nonfinite-error": (
        with_nonfinite_error,
        DataError,
        r"activation '(x|/Flatten_output_0)': \d+ non-finite values \(NaN/Inf\) .*"
        r"--nonfinite skip",
    ),
    "exclude-names-no-node": (
        exclude("/fc/Gem"),
        RecipeError,
        r"exclude names node '/fc/Gem', which .*model\.onnx does not have: check the name",
    ),
    "override-names-no-node": (
        override_missing_node,
        RecipeError,
        r"overrides\[0\] names node '/fc/Gem', which .*model\.onnx does not have",
    ),
    "scales-of-another-model": (
        scales_of_another_model,
        ScalesError,
        r"other\.safetensors has no scales for activation 'x': recalibrate this model$",
    ),
}


def cli_argv(inputs: Inputs, out: Path) -> list[str]:
    argv = ["calibrate", str(inputs.model)]
    argv += ["--data", str(inputs.data)] if inputs.data is not None else []
    argv += ["-o", str(out / "q.onnx"), "--scales", str(out / "s.safetensors")]
    return [*argv, "--report", str(out / "r.json"), *inputs.argv]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(workdir, tmp_path, capsys, case):
    make, _, pattern = BAD[case]
    inputs = make(workdir, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()
    assert main(cli_argv(inputs, out)) == 2
    assert_one_error_line(capsys.readouterr(), pattern)
    assert os.listdir(out) == []


@pytest.mark.parametrize("case", [c for c in BAD if c != "override-names-no-node"])
def test_bad_input_raises_the_exact_error_class(workdir, tmp_path, case):
    """The override case goes through a recipe file, which only the CLI reads by path."""
    make, error, pattern = BAD[case]
    inputs = make(workdir, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(QcalError) as e:
        calibrate_onnx(inputs.model, inputs.data, output=out / "q.onnx", **inputs.options)
    assert type(e.value) is error
    assert len(str(e.value).splitlines()) == 1
    assert re.search(pattern, str(e.value)), str(e.value)
    assert os.listdir(out) == []


# ---- faults that are no error -----------------------------------------------------------------


def calibrated_report(workdir: Path, tmp_path: Path, inputs: Inputs) -> tuple[dict, dict]:
    """Run the CLI on ``inputs``; the report and the scales written."""
    out = tmp_path / "out"
    out.mkdir()
    assert main(cli_argv(inputs, out)) == 0
    report = json.loads((out / "r.json").read_text())
    assert onnx.load(str(out / "q.onnx")).graph.node
    return report, load_scales(out / "s.safetensors")[0]


def assert_finite_positive(scales: dict) -> None:
    for name, s in scales.items():
        assert bool(((s.scale > 0) & s.scale.isfinite()).all()), name
        assert bool(((s.amax > 0) & s.amax.isfinite()).all()), name


def test_dynamic_batch_sizes_calibrate(workdir, tmp_path):
    xs = data_batches(workdir)
    folder = write_batches(tmp_path / "sizes", [{"x": xs[0][:1]}, {"x": xs[1]}, {"x": xs[2][:3]}])
    report, scales = calibrated_report(workdir, tmp_path, Inputs(workdir / "model.onnx", folder))
    assert report["batches_per_pass"] == [3]
    seen = max(float(np.abs(x).max()) for x in (xs[0][:1], xs[1], xs[2][:3]))
    assert float(scales["x"].amax) == pytest.approx(seen, rel=1e-7)
    assert_finite_positive(scales)


def test_nonfinite_activations_are_counted_and_skipped_by_default(workdir, tmp_path):
    inputs = nan_data(workdir, tmp_path)
    report, scales = calibrated_report(workdir, tmp_path, inputs)
    rows = {r["tensor"]: r for r in report["tensors"]}
    assert rows["x"]["notes"] == ["3 non-finite values skipped"]
    xs = [np.load(p)["x"] for p in sorted(inputs.data.glob("*.npz"))]
    finite = [np.nan_to_num(x, nan=0, posinf=0, neginf=0) for x in xs]
    assert rows["x"]["amax"] == pytest.approx(max(float(np.abs(x).max()) for x in finite))
    assert_finite_positive(scales)


@pytest.mark.parametrize("value", [0.0, 2.5])
def test_zero_and_constant_activations_get_finite_positive_scales(workdir, tmp_path, value):
    """All-zero: amax floored and noted. Constant c: amax |c|, an ordinary scale."""
    folder = write_batches(tmp_path / "const", [{"x": np.full((2, 3, 8, 8), value, np.float32)}])
    inputs = Inputs(workdir / "model.onnx", folder, ["--activation-format", "int8"])
    report, scales = calibrated_report(workdir, tmp_path, inputs)
    rows = {r["tensor"]: r for r in report["tensors"]}
    assert_finite_positive(scales)
    if value == 0:
        assert rows["x"]["notes"] == ["zero range: amax floored to 1e-30"]
    else:
        assert rows["x"]["notes"] == []
        assert float(scales["x"].scale) == pytest.approx(value / 127, rel=1e-6)


def test_empty_batches_give_floored_scales_and_a_note(workdir, tmp_path):
    folder = write_batches(tmp_path / "empty", [{"x": np.zeros((0, 3, 8, 8), np.float32)}])
    report, scales = calibrated_report(workdir, tmp_path, Inputs(workdir / "model.onnx", folder))
    rows = {r["tensor"]: r for r in report["tensors"]}
    for tensor in ("x", "/Flatten_output_0"):
        assert rows[tensor]["notes"] == ["no values collected: amax floored"]
    assert_finite_positive(scales)


def test_wildcard_that_matches_no_node_is_a_note(workdir, tmp_path, caplog):
    flags = ["--exclude", "/decoder/*", "--target", "tensorrt"]
    inputs = Inputs(workdir / "model.onnx", workdir / "data", flags)
    report, _ = calibrated_report(workdir, tmp_path, inputs)
    note = f"exclude pattern '/decoder/*' matches no node of {workdir / 'model.onnx'}"
    assert report["plan_notes"] == [note]
    assert report["quantized_nodes"] == ["/conv/Conv", "/fc/Gemm"]
    assert note in caplog.text


def test_oldest_supported_opset_calibrates(workdir, tmp_path):
    """Opset 7, the oldest ONNX Runtime loads: calibrated, then raised for per-axis Q/DQ."""
    model = edited_model(workdir, tmp_path, "old.onnx", set_opset(7))
    report, scales = calibrated_report(workdir, tmp_path, Inputs(model, workdir / "data"))
    assert report["opset"]["from"] == 7 and report["opset"]["to"] >= 13
    assert math.isfinite(report["output_error"]["y"]["cosine"])
    assert report["output_error"]["y"]["cosine"] > 0.99
    assert_finite_positive(scales)

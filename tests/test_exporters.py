"""calibrate_onnx on the exporter corpus (tests/exporters.py): every weight ends up stored
quantized behind a DequantizeLinear, every weight op counts as quantized, the QDQ model loads in
ONNX Runtime and stays near the float model, and the report lists the pre-processing done."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from exporters import CORPUS, Export
from onnx import TensorProto

from qcal_export import calibrate_onnx
from qcal_export.cli import main
from qcal_export.graphs.op_inputs import WEIGHT_INPUTS

STORED = {"int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}


def quantized_weights(model: onnx.ModelProto, elem_type: int) -> list[str]:
    """Initializers of ``elem_type`` dequantized by a DequantizeLinear that feeds a weight op's
    weight input."""
    stored = {t.name for t in model.graph.initializer if t.data_type == elem_type}
    dequantized = {
        n.output[0]: n.input[0]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in stored
    }
    found = set()
    for node in model.graph.node:
        axes = WEIGHT_INPUTS.get(node.op_type)
        if axes is not None and node.input[axes.index] in dequantized:
            found.add(dequantized[node.input[axes.index]])
    return sorted(found)


def calibrate(export: Export, tmp_path: Path, fmt: str):
    """Calibrate at target tensorrt: only the nodes that take a weight are quantized."""
    source = tmp_path / "float.onnx"
    onnx.save(export.model, str(source))
    result = calibrate_onnx(
        source,
        export.batches,
        output=tmp_path / "q.onnx",
        report=tmp_path / "report.json",
        format=fmt,
        provider="cpu",
        target="tensorrt",
    )
    return source, result


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_weight_is_quantized_and_the_model_validates(name, fmt, tmp_path):
    export = CORPUS[name]()
    source, result = calibrate(export, tmp_path, fmt)
    original = onnx.load(str(source))
    quantized = onnx.load(str(result.model_path))
    assert len(quantized_weights(quantized, STORED[fmt])) == export.weights
    weight_ops = [n for n in original.graph.node if n.op_type in WEIGHT_INPUTS]
    assert len(result.report["quantized_nodes"]) == len(weight_ops)
    assert result.report["partially_quantized_nodes"] == {}
    assert result.report["preprocess"]["unfound_weights"] == {}
    for error in result.report["output_error"].values():
        assert error["cosine"] > 0.99
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    assert [o.name for o in session.get_outputs()] == ["y"]
    batch = export.batches[0]
    want = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, batch)
    got = session.run(None, batch)
    cosine = np.dot(want[0].ravel(), got[0].ravel()) / (
        np.linalg.norm(want[0]) * np.linalg.norm(got[0])
    )
    assert cosine > 0.99


CHANGES = {
    "constant_weights": ["named 7", "lifted 3 Constant", "2 weight(s) now initializers"],
    "fp16_cast": ["lifted 2 Constant", "folded 3 node(s)", "(Cast, Transpose)"],
    "initializers_as_inputs": ["['w2_t'] were also graph inputs", "folded 1 node(s)"],
    "nhwc_conv": ["lifted 3 Constant", "folded 1 node(s)", "(Transpose)"],
    "reshaped_weights": ["lifted 2 Constant", "(Identity, Reshape)"],
    "shared_weight": ["named 6", "1 weight(s) now initializers"],
    "transformer_block": ["shape inference recorded"],
}


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_the_report_lists_the_pre_processing(name, tmp_path):
    _, result = calibrate(CORPUS[name](), tmp_path, "int8")
    changes = " | ".join(result.report["preprocess"]["changes"])
    for expected in CHANGES[name]:
        assert expected in changes


def test_an_int8_model_of_constant_weights_is_smaller_than_the_float_one(tmp_path):
    """Before pre-processing, Constant weights got Q/DQ as activations and the model grew."""
    export = CORPUS["constant_weights"]()
    source, result = calibrate(export, tmp_path, "int8")
    assert result.model_path.stat().st_size < source.stat().st_size


def test_the_cli_summary_counts_the_quantized_nodes_and_lists_the_pre_processing(tmp_path, capsys):
    """The tf2onnx-style MLP as a user runs it: 2 nodes quantized, both weights, a smaller file."""
    export = CORPUS["constant_weights"]()
    source = tmp_path / "float.onnx"
    onnx.save(export.model, str(source))
    (tmp_path / "data").mkdir()
    for i, batch in enumerate(export.batches):
        np.savez(tmp_path / "data" / f"batch_{i:02d}.npz", **batch)
    out = tmp_path / "q.onnx"
    argv = ["calibrate", str(source), "--data", str(tmp_path / "data"), "-o", str(out)]
    assert main([*argv, "--format", "int8", "--provider", "cpu", "--target", "tensorrt"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "2 nodes quantized" in printed
    assert "pre-processing: lifted 3 Constant node(s) to initializers" in printed
    assert len(quantized_weights(onnx.load(str(out)), TensorProto.INT8)) == 2
    assert out.stat().st_size < source.stat().st_size

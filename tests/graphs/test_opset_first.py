"""A model below opset 13 whose Q/DQ export needs the version converter: onnx rewrites a
Softmax of opset < 13 into Flatten -> Softmax -> Reshape, so a plan made on the old graph no
longer finds the Softmax input it quantizes (paddle2onnx's opset-12 recognizer, ``--target
ort``). Oracles: ONNX Runtime on the float model, and the Q/DQ arithmetic read off the graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcal_export import calibrate_onnx
from qcal_export.graphs.opset_first import converted_for_export, export_opset
from qcal_export.graphs.targets import find_targets
from qcal_export.spec.recipe import Recipe

CPU = ["CPUExecutionProvider"]


def attention_scores(opset: int = 12) -> onnx.ModelProto:
    """``Squeeze(x [b, 1, 4, 8]) @ w [8, 8] -> Softmax(axis=2)``: the Squeeze without axes
    leaves the scores of unknown rank, as paddle2onnx's opset-12 recognizer has them (the
    converter then keeps the old 2-D semantics with Flatten and Reshape)."""
    w = np.random.default_rng(0).normal(0, 0.5, (8, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Squeeze", ["x"], ["rows"], "squeeze"),
            helper.make_node("MatMul", ["rows", "w"], ["scores"], "mm"),
            helper.make_node("Softmax", ["scores"], ["y"], "softmax", axis=2),
        ],
        "scores",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 1, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, 8])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def test_plan_needs_opset_13_and_the_converter_rewrites_the_softmax():
    model = attention_scores()
    plan = find_targets(model, Recipe(target="ort"))
    assert "scores" in plan.activations and export_opset(model, plan) == 13
    converted = converted_for_export(model, plan)
    ops = [node.op_type for node in converted.graph.node]
    assert ops == ["Squeeze", "MatMul", "Shape", "Flatten", "Softmax", "Reshape"]
    assert converted_for_export(attention_scores(13), plan) is None


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_ort_target_on_an_opset_12_softmax_exports_and_matches_float(tmp_path, fmt):
    path, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(attention_scores(), path)
    rng = np.random.default_rng(1)
    data = [{"x": rng.normal(0, 1, (2, 1, 4, 8)).astype(np.float32)} for _ in range(6)]
    result = calibrate_onnx(path, data, output=out, format=fmt, target="ort")
    assert any("opset raised from 12 to" in c for c in result.report["preprocess"]["changes"])
    assert result.report["opset"]["from"] == 12  # the file's, not the raised one
    q = onnx.load(out)
    producers = {o: n for n in q.graph.node for o in n.output}
    softmax = next(n for n in q.graph.node if n.op_type == "Softmax")
    flatten = producers[softmax.input[0]]
    assert flatten.op_type == "DequantizeLinear" or producers[flatten.input[0]].op_type == (
        "DequantizeLinear"
    )
    x = data[-1]["x"]
    want = ort.InferenceSession(path, providers=CPU).run(None, {"x": x})[0].ravel()
    got = ort.InferenceSession(out, providers=CPU).run(None, {"x": x})[0].ravel()
    assert got @ want / np.linalg.norm(got) / np.linalg.norm(want) > 0.99

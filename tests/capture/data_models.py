"""The small models and batches that tests/capture's data tests share (built with onnx.helper)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcal_export.capture.data import as_feed, model_inputs


def two_input_model() -> onnx.ModelProto:
    """Inputs x float32 [batch, 3] and ids int64 [batch, 4]; w is an initializer also listed
    as a graph input (old exporters do that) and must not be asked for."""
    w = numpy_helper.from_array(np.ones((3, 2), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], "mm"),
            helper.make_node("Identity", ["ids"], ["ids_out"], "id"),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["batch", 4]),
        ],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def one_input_model() -> onnx.ModelProto:
    """Input x float32 [batch, 3] with a symbolic batch."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], "relu")],
        "one_input",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


TWO = model_inputs(two_input_model())
ONE = model_inputs(one_input_model())


def batch(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, 3)).astype(np.float32),
        "ids": rng.integers(0, 100, size=(n, 4)).astype(np.int64),
    }


def feeds(source, inputs) -> list[dict[str, np.ndarray]]:
    """One pass over ``source``, each item checked as the capture checks it."""
    return [as_feed(item, inputs, i) for i, item in enumerate(source.batches())]

"""Small graphs built with onnx.helper for test_targets.py and test_targets_inputs.py: a checked
opset-17 model from nodes, and one-node MatMul, Gemm and Conv models with their weights.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT


def weight(name: str, shape: tuple[int, ...], dtype=np.float32) -> TensorProto:
    values = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) / 7.0 - 1.0
    return numpy_helper.from_array(values.astype(dtype), name)


def model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, tuple[int, list]],
    outputs: dict[str, tuple[int, list]],
    initializers: list[TensorProto] = (),
) -> onnx.ModelProto:
    """A checked opset-17 model; inputs/outputs map name -> (elem type, shape)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in outputs.items()],
        initializer=list(initializers),
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    return m


def matmul_model(weight_shape: tuple[int, ...]) -> onnx.ModelProto:
    k, n = weight_shape[-2:]
    batch = list(weight_shape[:-2]) or ["b"]
    return model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], "mm")],
        {"x": (FLOAT, [*batch, 3, k])},
        {"y": (FLOAT, [*batch, 3, n])},
        [weight("w", weight_shape)],
    )


def gemm_model(trans_b: int) -> onnx.ModelProto:
    w_shape = (5, 4) if trans_b else (4, 5)
    return model(
        [helper.make_node("Gemm", ["x", "w", "bias"], ["y"], "gemm", transB=trans_b)],
        {"x": (FLOAT, ["b", 4])},
        {"y": (FLOAT, ["b", 5])},
        [weight("w", w_shape), weight("bias", (5,))],
    )


def conv_model(op_type: str) -> onnx.ModelProto:
    w_shape = (6, 2, 3, 3) if op_type == "Conv" else (2, 6, 3, 3)
    out = ["b", 6, 4, 4] if op_type == "Conv" else ["b", 6, 6, 6]
    return model(
        [helper.make_node(op_type, ["x", "w", "bias"], ["y"], "conv")],
        {"x": (FLOAT, ["b", 2, 6, 6] if op_type == "Conv" else ["b", 2, 4, 4])},
        {"y": (FLOAT, out)},
        [weight("w", w_shape), weight("bias", (6,))],
    )

"""Small graphs as exporters write them, and calibrate_onnx at target tensorrt, shared by the
tests of calibrate_onnx on such models (test_pipeline_models, test_unrunnable_models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import qcal_export


def calibrate_onnx(*args, **options):
    """``qcal_export.calibrate_onnx`` at target tensorrt: these cases are about the models'
    inputs, weights and scales, on the compute ops' Q/DQ (not ORT's element-wise placement)."""
    return qcal_export.calibrate_onnx(*args, **{"target": "tensorrt", **options})


FORMATS = {
    "int8": {"format": "int8"},
    "uint8": {"format": "uint8"},
    "int4": {"format": "int4", "block_size": 16},
    "fp8": {"format": "fp8"},
    "nvfp4": {"format": "nvfp4"},
}


def save(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def matmul_graph(
    w: np.ndarray, x_shape: list, elem_type: int = TensorProto.FLOAT, weight_first: bool = False
) -> onnx.GraphProto:
    """``y = x @ W`` (or ``W @ x``) with W an initializer, named 'mm'."""
    inputs = ["W", "x"] if weight_first else ["x", "W"]
    y_shape = [w.shape[0], x_shape[1]] if weight_first else [x_shape[0], w.shape[1]]
    return helper.make_graph(
        [helper.make_node("MatMul", inputs, ["y"], "mm")],
        "g",
        [helper.make_tensor_value_info("x", elem_type, x_shape)],
        [helper.make_tensor_value_info("y", elem_type, y_shape)],
        [numpy_helper.from_array(w, "W")],
    )


def scale_of(model: onnx.ModelProto, tensor: str) -> np.ndarray:
    """The scale initializer of the QuantizeLinear (or DequantizeLinear) reading ``tensor``."""
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[0] in (
            tensor,
            f"{tensor}_quantized",
        ):
            return initializers[node.input[1]]
    raise AssertionError(f"no Q/DQ reads {tensor}")


def qdq64(x: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """Symmetric int8 QuantizeLinear -> DequantizeLinear in float64."""
    scale = scale.astype(np.float64)
    return np.clip(np.round(x.astype(np.float64) / scale), -qmax - 1, qmax) * scale

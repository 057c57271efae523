"""One-node QDQ cases shared by test_qdq.py, test_opset.py and test_export.py: the models, the
scales computed by hand for them, and running a model in ONNX Runtime (CPUExecutionProvider).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from hand_scales import scales_from_range
from onnx import TensorProto, helper, numpy_helper

from qcal_export.graphs.targets import find_targets
from qcal_export.spec.recipe import Recipe, TensorSpec
from qcal_export.spec.scales import TensorScales

FLOAT = TensorProto.FLOAT
BATCH = 3
RTOL = ATOL = 1e-5


# models ---------------------------------------------------------------------------------------


@dataclass
class Case:
    """A one-node model with its float weight/bias and how torch computes the node."""

    model: onnx.ModelProto
    x: np.ndarray
    w: np.ndarray
    bias: np.ndarray | None
    op: str
    trans_b: int = 0

    def apply(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else torch.from_numpy(self.bias)
        if self.op == "MatMul":
            return torch.matmul(x, w)
        if self.op == "Gemm":
            return F.linear(x, w if self.trans_b else w.T, bias)
        if self.op == "Conv":
            return F.conv2d(x, w, bias, padding=1, groups=2)
        return F.conv_transpose2d(x, w, bias, stride=2, padding=1, output_padding=1)


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list],
    outputs: dict[str, list],
    initializers: list[TensorProto],
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, FLOAT, s) for n, s in outputs.items()],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def make_case(op: str, opset: int = 17, seed: int = 0) -> Case:
    """MatMul [b, 3, 8] x [8, 6]; Gemm [b, 8] x [6, 8]^T or [8, 6]; Conv 4->6 (groups 2);
    ConvTranspose 4->6 stride 2; all with a dynamic batch."""
    rng = np.random.default_rng(seed)
    trans_b = int(op == "Gemm1")
    op_type = op.rstrip("01")
    x_shape, w_shape, y_shape, attrs = {
        "MatMul": ([BATCH, 3, 8], (8, 6), ["b", 3, 6], {}),
        "Gemm": ([BATCH, 8], (6, 8) if trans_b else (8, 6), ["b", 6], {"transB": trans_b}),
        "Conv": ([BATCH, 4, 5, 5], (6, 2, 3, 3), ["b", 6, 5, 5], {"pads": [1] * 4, "group": 2}),
        "ConvTranspose": (
            [BATCH, 4, 4, 4],
            (4, 6, 3, 3),
            ["b", 6, 8, 8],
            {"pads": [1] * 4, "strides": [2, 2], "output_padding": [1, 1]},
        ),
    }[op_type]
    x = rng.normal(0, 1, x_shape).astype(np.float32)
    # magnitudes spread over 16x, and an offset so uint8 zero points are not all 0 or 128
    w = rng.normal(0.2, 0.5, w_shape) * 2.0 ** rng.uniform(-2, 2, w_shape)
    w = w.astype(np.float32)
    bias = None if op_type == "MatMul" else rng.normal(0, 1, y_shape[1]).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        inputs.append("bias")
    model = make_model(
        [helper.make_node(op_type, inputs, ["y"], "node", **attrs)],
        {"x": ["b", *x_shape[1:]]},
        {"y": y_shape},
        inits,
        opset,
    )
    return Case(model, x, w, bias, op_type, trans_b)


def weight_axis_reduce(w: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) per index of ``axis`` (shape [C]) or of the whole tensor (shape [])."""
    if axis is None:
        return w.min(), w.max()
    rows = w.movedim(axis, 0).reshape(w.shape[axis], -1)
    return rows.min(dim=1).values, rows.max(dim=1).values


def tensor_scales(
    name: str, kind: str, fmt_name: str, values: np.ndarray, axis: int | None, shrink: float = 1.0
) -> TensorScales:
    """Scales by hand: the format's scale/zero point for the (shrunk) range of ``values``."""
    amin, amax = weight_axis_reduce(torch.from_numpy(values), axis)
    return scales_from_range(name, kind, fmt_name, "max", axis, amin * shrink, amax * shrink)


def broadcast(t: torch.Tensor, axis: int | None, rank: int) -> torch.Tensor:
    if axis is None:
        return t
    return t.reshape([-1 if i == axis else 1 for i in range(rank)])


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs in ORT with basic optimizations only: the QDQ graph's own arithmetic.

    Extended optimizations fuse DQ -> MatMul into MatMulIntegerToFloat, whose u8s8 kernel on
    x86 CPUs without VNNI saturates 16-bit partial sums: a property of that kernel, not of the
    graph under test.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feed)


def count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(n.op_type == op_type for n in model.graph.node)


def initializers(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def recipe_for(fmt_name: str, per_channel: bool, mode: str = "quantized") -> Recipe:
    return Recipe(
        activation=TensorSpec(fmt_name),
        weight=TensorSpec(fmt_name, per_channel=per_channel),
        weights_mode=mode,
    )


def plan_and_scales(case: Case, recipe: Recipe):
    plan = find_targets(case.model, recipe)
    assert list(plan.activations) == ["x"] and list(plan.weights) == ["w"]
    axis = plan.weights["w"].axis
    fmt_name = recipe.activation.format
    scales = {
        "x": tensor_scales("x", "activation", fmt_name, case.x, None, shrink=0.8),
        "w": tensor_scales("w", "weight", recipe.weight.format, case.w, axis),
    }
    return plan, scales, axis

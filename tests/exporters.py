"""Small models written the way other exporters write them, built with onnx.helper: weights in
``Constant`` nodes (tf2onnx, paddle2onnx), float16 weights behind a Cast, initializers listed as
graph inputs, NHWC inputs with Transposes around Conv (tf2onnx), weights behind Transpose /
Reshape / Identity, one weight shared by two MatMuls, nodes without names, and an optimum-style
transformer block (LayerNormalization, attention with Softmax).

Each builder returns an ``Export``: the checked model, its random calibration batches, and the
number of weights a calibration must quantize (one per distinct weight tensor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT


@dataclass
class Export:
    model: onnx.ModelProto
    batches: list[dict[str, np.ndarray]]
    weights: int


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _weight(rng: np.random.Generator, *shape: int, dtype=np.float32) -> np.ndarray:
    fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else shape[0]
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)


def _constant(name: str, array: np.ndarray, node: str = "") -> onnx.NodeProto:
    value = numpy_helper.from_array(array, name)
    return helper.make_node("Constant", [], [name], node, value=value)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    y_shape: list,
    initializers: list[TensorProto] = (),
    opset: int = 17,
) -> onnx.ModelProto:
    y = helper.make_tensor_value_info("y", FLOAT, y_shape)
    graph = helper.make_graph(nodes, "export", inputs, [y], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _batches(shape: tuple[int, ...], seed: int, count: int = 10) -> list[dict[str, np.ndarray]]:
    rng = _rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def constant_weights() -> Export:
    """tf2onnx / paddle2onnx: an MLP whose weights and biases are Constant nodes, no names."""
    rng = _rng(1)
    nodes = [
        _constant("w1", _weight(rng, 16, 32)),
        _constant("b1", _weight(rng, 32, 1)[:, 0]),
        _constant("w2", _weight(rng, 32, 8)),
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", FLOAT, ["n", 16])
    return Export(_model(nodes, [x], ["n", 8]), _batches((4, 16), 11), 2)


def fp16_cast() -> Export:
    """An fp16 export run in float32: float16 Constant weights -> Cast -> Transpose -> MatMul,
    and a float16 Gemm weight (transB) behind a Cast."""
    rng = _rng(2)
    nodes = [
        _constant("w1_16", _weight(rng, 32, 16, dtype=np.float16)),
        helper.make_node("Cast", ["w1_16"], ["w1_32"], "cast1", to=FLOAT),
        helper.make_node("Transpose", ["w1_32"], ["w1"], "t1", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w1"], ["h"], "mm1"),
        helper.make_node("Tanh", ["h"], ["a"], "tanh"),
        _constant("w2_16", _weight(rng, 8, 32, dtype=np.float16)),
        helper.make_node("Cast", ["w2_16"], ["w2"], "cast2", to=FLOAT),
        helper.make_node("Gemm", ["a", "w2"], ["y"], "gemm", transB=1),
    ]
    x = helper.make_tensor_value_info("x", FLOAT, ["n", 16])
    return Export(_model(nodes, [x], ["n", 8]), _batches((4, 16), 12), 2)


def initializers_as_inputs() -> Export:
    """keep_initializers_as_inputs: every initializer is also a graph input; one weight is
    read directly, one through a Transpose."""
    rng = _rng(3)
    inits = [
        numpy_helper.from_array(_weight(rng, 16, 24), "w1"),
        numpy_helper.from_array(_weight(rng, 8, 24), "w2_t"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], "mm1"),
        helper.make_node("Relu", ["h"], ["r"], "relu"),
        helper.make_node("Transpose", ["w2_t"], ["w2"], "t2", perm=[1, 0]),
        helper.make_node("MatMul", ["r", "w2"], ["y"], "mm2"),
    ]
    inputs = [helper.make_tensor_value_info("x", FLOAT, ["n", 16])]
    inputs += [helper.make_tensor_value_info(t.name, FLOAT, list(t.dims)) for t in inits]
    return Export(_model(nodes, inputs, ["n", 8], inits), _batches((4, 16), 13), 2)


def nhwc_conv() -> Export:
    """tf2onnx: an NHWC input, Transpose to NCHW around each Conv, Constant weights and bias."""
    rng = _rng(4)
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_nchw"], "to_nchw", perm=[0, 3, 1, 2]),
        _constant("k1", _weight(rng, 8, 3, 3, 3)),
        _constant("c1", _weight(rng, 8, 1)[:, 0]),
        helper.make_node("Conv", ["x_nchw", "k1", "c1"], ["conv1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"], "relu1"),
        _constant("k2_hwio", _weight(rng, 3, 3, 8, 4)),
        helper.make_node("Transpose", ["k2_hwio"], ["k2"], "k2_oihw", perm=[3, 2, 0, 1]),
        helper.make_node("Conv", ["relu1", "k2"], ["conv2"], "conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["conv2"], ["y"], "to_nhwc", perm=[0, 2, 3, 1]),
    ]
    x = helper.make_tensor_value_info("x", FLOAT, ["n", 8, 8, 3])
    return Export(_model(nodes, [x], ["n", 8, 8, 4]), _batches((2, 8, 8, 3), 14), 2)


def reshaped_weights() -> Export:
    """Weights behind Reshape (a flat Constant and a Constant shape) and behind Identity."""
    rng = _rng(5)
    inits = [numpy_helper.from_array(_weight(rng, 24, 8), "w2")]
    nodes = [
        _constant("w1_flat", _weight(rng, 16, 24).reshape(-1)),
        _constant("w1_shape", np.array([16, 24], np.int64)),
        helper.make_node("Reshape", ["w1_flat", "w1_shape"], ["w1"], "w1_reshape"),
        helper.make_node("MatMul", ["x", "w1"], ["h"], "mm1"),
        helper.make_node("Sigmoid", ["h"], ["s"], "sigmoid"),
        helper.make_node("Identity", ["w2"], ["w2_copy"], "w2_identity"),
        helper.make_node("MatMul", ["s", "w2_copy"], ["y"], "mm2"),
    ]
    x = helper.make_tensor_value_info("x", FLOAT, ["n", 16])
    return Export(_model(nodes, [x], ["n", 8], inits), _batches((4, 16), 15), 2)


def shared_weight() -> Export:
    """One Constant weight, transposed once, read by two MatMuls (tied projections)."""
    rng = _rng(6)
    nodes = [
        _constant("w_t", _weight(rng, 16, 16)),
        helper.make_node("Transpose", ["w_t"], ["w"], "", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w"], ["a"], ""),
        helper.make_node("Relu", ["a"], ["r"], ""),
        helper.make_node("MatMul", ["r", "w"], ["b"], ""),
        helper.make_node("Add", ["a", "b"], ["y"], ""),
    ]
    x = helper.make_tensor_value_info("x", FLOAT, ["n", 16])
    return Export(_model(nodes, [x], ["n", 16]), _batches((4, 16), 16), 1)


def transformer_block(seq: int = 6, dim: int = 32, heads: int = 4) -> Export:
    """optimum-style encoder block: initializer weights, MatMul + Add projections,
    LayerNormalization, scaled-dot-product attention with Softmax, a residual Add; the shape
    of the heads in a Constant node (as torch's exporter writes shapes)."""
    rng = _rng(7)
    head = dim // heads
    inits = [
        numpy_helper.from_array(np.ones(dim, np.float32), "ln.weight"),
        numpy_helper.from_array(np.zeros(dim, np.float32), "ln.bias"),
        numpy_helper.from_array(np.array([0, 0, dim], np.int64), "merge_heads"),
        numpy_helper.from_array(np.array(1 / np.sqrt(head), np.float32), "scale"),
    ]
    nodes = [
        _constant("split_heads", np.array([0, 0, heads, head], np.int64), "/Constant"),
        helper.make_node(
            "LayerNormalization", ["x", "ln.weight", "ln.bias"], ["ln"], "/ln", axis=-1
        ),
    ]
    for p in ("q", "k", "v"):
        inits += [
            numpy_helper.from_array(_weight(rng, dim, dim), f"{p}.weight"),
            numpy_helper.from_array(_weight(rng, dim, 1)[:, 0], f"{p}.bias"),
        ]
        nodes += [
            helper.make_node("MatMul", ["ln", f"{p}.weight"], [f"{p}_mm"], f"/{p}/MatMul"),
            helper.make_node("Add", [f"{p}_mm", f"{p}.bias"], [f"{p}_b"], f"/{p}/Add"),
            helper.make_node("Reshape", [f"{p}_b", "split_heads"], [f"{p}_h"], f"/{p}/Reshape"),
        ]
    nodes += [
        helper.make_node("Transpose", ["q_h"], ["q_t"], "/q/Transpose", perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k_h"], ["k_t"], "/k/Transpose", perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v_h"], ["v_t"], "/v/Transpose", perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["q_t", "k_t"], ["scores"], "/attn/MatMul"),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"], "/attn/Mul"),
        helper.make_node("Softmax", ["scaled"], ["probs"], "/attn/Softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v_t"], ["ctx"], "/attn/MatMul_1"),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], "/attn/Transpose", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge_heads"], ["ctx_m"], "/attn/Reshape"),
    ]
    inits += [
        numpy_helper.from_array(_weight(rng, dim, dim), "o.weight"),
        numpy_helper.from_array(_weight(rng, dim, 1)[:, 0], "o.bias"),
    ]
    nodes += [
        helper.make_node("MatMul", ["ctx_m", "o.weight"], ["o_mm"], "/o/MatMul"),
        helper.make_node("Add", ["o_mm", "o.bias"], ["o_b"], "/o/Add"),
        helper.make_node("Add", ["x", "o_b"], ["y"], "/residual/Add"),
    ]
    x = helper.make_tensor_value_info("x", FLOAT, ["batch", seq, dim])
    y_shape = ["batch", seq, dim]
    return Export(_model(nodes, [x], y_shape, inits), _batches((2, seq, dim), 17), 4)


CORPUS: dict[str, Callable[[], Export]] = {
    "constant_weights": constant_weights,
    "fp16_cast": fp16_cast,
    "initializers_as_inputs": initializers_as_inputs,
    "nhwc_conv": nhwc_conv,
    "reshaped_weights": reshaped_weights,
    "shared_weight": shared_weight,
    "transformer_block": transformer_block,
}

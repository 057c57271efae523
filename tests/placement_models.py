"""Hand-built models for the placement tests: a ResNet-like CNN (residual Add, pooling, Concat)
and a one-head attention block (embedding Gather, bias Add, Transpose, Softmax, Sigmoid)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(7)


def _init(name: str, shape: tuple[int, ...], scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def cnn_model(batch: int | str = "N") -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv -> Relu -> Conv -> Add(residual) -> MaxPool -> Conv 1x1 -> Concat
    -> GlobalAveragePool -> Flatten -> Gemm -> y[N,5]."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["t1"], "c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["t1"], ["r1"], "relu"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["t2"], "c2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["t2", "r1"], ["a"], "add"),
        helper.make_node("MaxPool", ["a"], ["p"], "pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "w3"], ["t3"], "c3"),
        helper.make_node("Concat", ["p", "t3"], ["cat"], "concat", axis=1),
        helper.make_node("GlobalAveragePool", ["cat"], ["g"], "gap"),
        helper.make_node("Flatten", ["g"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", "wfc", "bfc"], ["y"], "fc", transB=1),
    ]
    inits = [
        _init("w1", (8, 3, 3, 3)),
        _init("b1", (8,), 0.1),
        _init("w2", (8, 8, 3, 3), 0.15),
        _init("b2", (8,), 0.1),
        _init("w3", (8, 8, 1, 1)),
        _init("wfc", (5, 16)),
        _init("bfc", (5,), 0.1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def attention_model() -> onnx.ModelProto:
    """ids[N,S] -> Gather(embedding) -> MatMul q (+ bias Add), MatMul k -> Transpose ->
    MatMul -> Mul(scale) -> Softmax -> MatMul(values) -> Sigmoid -> Reshape -> y[N,S*8]."""
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], "embed"),
        helper.make_node("MatMul", ["e", "wq"], ["q"], "mq"),
        helper.make_node("Add", ["q", "bq"], ["q2"], "bias"),
        helper.make_node("MatMul", ["e", "wk"], ["k"], "mk"),
        helper.make_node("Transpose", ["k"], ["kt"], "tk", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q2", "kt"], ["s"], "qk"),
        helper.make_node("Mul", ["s", "c"], ["s2"], "scale"),
        helper.make_node("Softmax", ["s2"], ["pr"], "softmax", axis=-1),
        helper.make_node("MatMul", ["pr", "e"], ["o"], "pv"),
        helper.make_node("Sigmoid", ["o"], ["sg"], "sigmoid"),
        helper.make_node("Reshape", ["sg", "shape"], ["y"], "flat"),
    ]
    inits = [
        _init("table", (16, 8), 1.0),
        _init("wq", (8, 8)),
        _init("bq", (8,), 0.1),
        _init("wk", (8, 8)),
        numpy_helper.from_array(np.array(0.35, np.float32), "c"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 48])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def cnn_batches(count: int = 4, batch: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(11)
    return [{"x": rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)} for _ in range(count)]


def attention_batches(count: int = 4, batch: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(12)
    return [{"ids": rng.integers(0, 16, (batch, 6)).astype(np.int64)} for _ in range(count)]


def residual_norm_model() -> onnx.ModelProto:
    """x[N,6,32] -> MatMul -> Add(bias) -> Add(residual x) -> LayerNormalization -> MatMul ->
    Sigmoid -> y[N,6,4]: a post-norm transformer block's residual stream, whose channel 0
    carries an outlier (a bias of 100) that the norm's gamma turns down."""
    gamma = np.ones(32, np.float32)
    gamma[0] = 0.01
    bias = RNG.standard_normal(32).astype(np.float32) * 0.1
    bias[0] = 100.0
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], "dense"),
        helper.make_node("Add", ["h", "b1"], ["hb"], "bias"),
        helper.make_node("Add", ["hb", "x"], ["r"], "residual"),
        helper.make_node("LayerNormalization", ["r", "gamma", "beta"], ["n"], "norm", axis=-1),
        helper.make_node("MatMul", ["n", "w2"], ["z"], "head"),
        helper.make_node("Sigmoid", ["z"], ["y"], "sigmoid"),
    ]
    inits = [
        _init("w1", (32, 32), 0.2),
        numpy_helper.from_array(bias, "b1"),
        numpy_helper.from_array(gamma, "gamma"),
        numpy_helper.from_array(np.zeros(32, np.float32), "beta"),
        _init("w2", (32, 4), 0.5),
    ]
    graph = helper.make_graph(
        nodes,
        "residual_norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def residual_norm_batches(count: int = 4, batch: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(13)
    return [{"x": rng.standard_normal((batch, 6, 32)).astype(np.float32)} for _ in range(count)]

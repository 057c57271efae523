"""The three-node MLP of test_onnxruntime.py, its float32 numpy forward pass, batches and a sink
that records what a capture hands on: shared with test_iobinding.py.

The model is ``x [batch, 4] -> MatMul(W1 [4, 5]) -> h -> Relu -> r -> MatMul(W2 [5, 3]) -> y``.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(1234)
W1 = RNG.standard_normal((4, 5)).astype(np.float32)
W2 = RNG.standard_normal((5, 3)).astype(np.float32)
FLOAT = TensorProto.FLOAT


def mlp(x_dims: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], "mm1"),
            helper.make_node("Relu", ["h"], ["r"], "relu"),
            helper.make_node("MatMul", ["r", "W2"], ["y"], "mm2"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", FLOAT, x_dims or ["batch", 4])],
        [helper.make_tensor_value_info("y", FLOAT, ["batch", 3])],
        [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def reference(x: np.ndarray) -> dict[str, np.ndarray]:
    """The float32 numpy forward pass: every intermediate tensor of the model."""
    h = x @ W1
    r = np.maximum(h, np.float32(0))
    return {"x": x, "h": h, "r": r, "y": r @ W2}


def data(sizes=(3, 1, 7, 2), seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((n, 4)).astype(np.float32)} for n in sizes]


class Recorder:
    """A sink that keeps every (name, value) it is given, in order."""

    def __init__(self):
        self.calls: list[tuple[str, torch.Tensor]] = []

    def __call__(self, name: str, value: torch.Tensor) -> None:
        self.calls.append((name, value.clone()))

    def values(self, name: str) -> list[np.ndarray]:
        return [v.numpy() for n, v in self.calls if n == name]

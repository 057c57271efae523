"""A small torch MLP exported to ONNX, for the block-format (int4, nvfp4) end-to-end tests.

``Linear(64, 48) -> GELU -> Linear(48, 40) -> GELU -> Linear(40, 8)``: the last layer's 40 inputs
end in a partial block of 16. ``seq=True`` exports ``[b, 5, 64]`` inputs (MatMul with the
exporter's transposed ``onnx::MatMul_*`` weights and an Add for the bias); ``seq=False``
exports ``[b, 64]`` inputs (Gemm, transB=1, weights named ``up.weight`` ...). Heavy-tailed data.
``half_mlp``: a float16 MLP written with onnx.helper; ``constant_mul_mlp``: an MLP scaled by
a Constant node's value.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

LAYERS = ("up", "down", "head")
BATCHES = 3


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 48)
        self.down = torch.nn.Linear(48, 40)
        self.head = torch.nn.Linear(40, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gelu = torch.nn.functional.gelu
        return self.head(gelu(self.down(gelu(self.up(x)))))


def make_mlp(root: Path, seq: bool, module: Callable[[], torch.nn.Module] = MLP) -> Path:
    """mlp.onnx (opset 17) of ``module()`` (built after seeding torch; 64 in-features) and
    data/ (3 .npz batches of 4) in ``root``; returns ``root``."""
    torch.manual_seed(0)
    shape = (2, 5, 64) if seq else (2, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module().eval(),
            (torch.randn(*shape),),
            str(root / "mlp.onnx"),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
        )
    (root / "data").mkdir()
    rng = np.random.default_rng(0)
    for i in range(BATCHES):
        x = rng.standard_t(4, (4, *shape[1:])).astype(np.float32)
        np.savez(root / "data" / f"batch_{i}.npz", x=x)
    return root


def batches(root: Path) -> list[np.ndarray]:
    return [np.load(p)["x"] for p in sorted((root / "data").glob("*.npz"))]


def half_mlp(rng: np.random.Generator) -> onnx.ModelProto:
    """x ``[N, 3, 16]`` float16 -> MatMul -> Relu -> MatMul -> y ``[N, 3, 4]``, opset 17; the
    weights drawn from ``rng``."""
    half = TensorProto.FLOAT16
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], "m1"),
            helper.make_node("Relu", ["h"], ["r"], "relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], "m2"),
        ],
        "half",
        [helper.make_tensor_value_info("x", half, ["N", 3, 16])],
        [helper.make_tensor_value_info("y", half, ["N", 3, 4])],
        [
            numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float16), "w1"),
            numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float16), "w2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def constant_mul_mlp(
    constant: float | np.ndarray, dims: list, outputs: int, rng: np.random.Generator
) -> onnx.ModelProto:
    """x ``[*dims]`` -> MatMul -> h -> Mul by a Constant node's value c -> MatMul -> y, float32,
    opset 17, the weights drawn from ``rng``: at the ort placement c is quantized as an
    activation (a Mul's input). A float ``constant`` is written as ``value_float``, an array as
    ``value``."""
    width = dims[-1]
    value = (
        {"value_float": constant}
        if isinstance(constant, float)
        else {"value": numpy_helper.from_array(constant)}
    )
    shapes = ((width, width), (width, outputs))
    weights = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], "mm1"),
            helper.make_node("Constant", [], ["c"], "const", **value),
            helper.make_node("Mul", ["h", "c"], ["m"], "mul"),
            helper.make_node("MatMul", ["m", "w2"], ["y"], "mm2"),
        ],
        "constant_mul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims[:-1], outputs])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights, start=1)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

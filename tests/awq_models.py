"""A small transformer-like block with outlier input channels for AWQ's tests (the analysis
step, calibrate_onnx and the CLI): three layers share the LayerNormalization's output (q and v
MatMuls, k a Gemm with transB and a bias), a MatMul reads an element-wise result (AWQ inserts a
Mul), and a MatMul + bias Add feeds the last MatMul (AWQ folds into the first).

x [N, 64] -> LN (gamma with outliers) -> h; a = q * k + v; t = a Wo + bo; y = t Wd + x.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WIDTH = 64
OUTLIERS = (3, 17, 40, 41)
"""The input channels whose activations are far larger than the others'."""


def block_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    gamma = np.ones(WIDTH, dtype=np.float32)
    gamma[list(OUTLIERS)] = 25.0

    def weight(*shape: int) -> np.ndarray:
        return (rng.normal(0, 1, shape) / np.sqrt(shape[0])).astype(np.float32)

    inits = [
        numpy_helper.from_array(gamma, "gamma"),
        numpy_helper.from_array(rng.normal(0, 0.1, WIDTH).astype(np.float32), "beta"),
        numpy_helper.from_array(weight(WIDTH, WIDTH), "wq"),
        numpy_helper.from_array(weight(WIDTH, WIDTH), "wk"),
        numpy_helper.from_array(rng.normal(0, 0.1, WIDTH).astype(np.float32), "bk"),
        numpy_helper.from_array(weight(WIDTH, WIDTH), "wv"),
        numpy_helper.from_array(weight(WIDTH, WIDTH), "wo"),
        numpy_helper.from_array(rng.normal(0, 0.1, WIDTH).astype(np.float32), "bo"),
        numpy_helper.from_array(weight(WIDTH, WIDTH), "wd"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1),
        helper.make_node("MatMul", ["h", "wq"], ["q"], name="q"),
        helper.make_node("Gemm", ["h", "wk", "bk"], ["k"], name="k", transB=1),
        helper.make_node("MatMul", ["h", "wv"], ["v"], name="v"),
        helper.make_node("Mul", ["q", "k"], ["qk"], name="qk"),
        helper.make_node("Add", ["qk", "v"], ["a"], name="a"),
        helper.make_node("MatMul", ["a", "wo"], ["m"], name="o"),
        helper.make_node("Add", ["m", "bo"], ["t"], name="bias"),
        helper.make_node("MatMul", ["t", "wd"], ["r"], name="d"),
        helper.make_node("Add", ["r", "x"], ["y"], name="residual"),
    ]
    graph = helper.make_graph(
        nodes,
        "awq_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, WIDTH])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def block_batches(count: int, rows: int = 32, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (rows, WIDTH)).astype(np.float32)} for _ in range(count)]


def write_block(folder: Path, batches: int = 6, seed: int = 1) -> Path:
    """model.onnx and data/ (``batches`` .npz batches) in ``folder``; returns the model path."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(block_model(), folder / "model.onnx")
    (folder / "data").mkdir(exist_ok=True)
    for i, batch in enumerate(block_batches(batches, seed=seed)):
        np.savez(folder / "data" / f"batch_{i:03d}.npz", **batch)
    return folder / "model.onnx"

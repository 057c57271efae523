"""AWQ's clip on the graph: the weight of each node named is clamped per block of input channels
and output channel to ``ratio * max|block|``, for MatMul (``[K, N]``) and Gemm transB
(``[N, K]``) layouts alike; other weights are left alone."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from qcal_export.graphs.awq_clip import Clip, clip_weights


def model(wm: np.ndarray, wg: np.ndarray):
    nodes = [
        helper.make_node("MatMul", ["x", "wm"], ["m"], name="mm"),
        helper.make_node("Gemm", ["m", "wg"], ["y"], name="gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "clip",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        [numpy_helper.from_array(wm, "wm"), numpy_helper.from_array(wg, "wg")],
    )
    return helper.make_model(graph)


def weight(m, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == name))


def test_blocks_are_clamped_to_their_ratio_of_their_max():
    wm = np.array([[1, -8, 2], [-4, 1, 2], [2, 2, -1], [0.5, 3, 4]], dtype=np.float32)
    wg = np.array([[1, -2, 3, -4], [4, 3, 2, 1]], dtype=np.float32)  # [N=2, K=4]
    m = model(wm, wg)
    clip_weights(m, {"mm": Clip(np.array([[0.5, 0.5, 1.0], [1.0, 0.5, 0.5]]), 2, 0)})
    expected = np.array([[1, -4, 2], [-2, 1, 2], [2, 1.5, -1], [0.5, 1.5, 2]], dtype=np.float32)
    np.testing.assert_array_equal(weight(m, "wm"), expected)
    np.testing.assert_array_equal(weight(m, "wg"), wg)
    clip_weights(m, {"gemm": Clip(np.array([[0.5, 1.0], [0.75, 0.5]]), 2, 1)})
    expected_g = np.array([[1, -1, 3, -3], [4, 3, 1, 1]], dtype=np.float32)
    np.testing.assert_array_equal(weight(m, "wg"), expected_g)

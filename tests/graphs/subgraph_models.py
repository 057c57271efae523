"""A model with an If and a Loop whose branches and body hold MatMuls, and its batches: shared by
test_subgraphs.py and test_ort_forms.py."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
# attribute order: make_node sorts them by name
SUBGRAPH_NODES = ["if/else_branch/else_mm", "if/then_branch/then_mm", "loop/body/body_mm"]


def weight(name: str, seed: int) -> onnx.TensorProto:
    values = np.random.default_rng(seed).standard_normal((4, 4)).astype(np.float32) / 2
    return numpy_helper.from_array(values, name)


def branch(name: str, seed: int) -> onnx.GraphProto:
    """``h @ w`` with ``h`` from the outer graph and ``w`` the branch's own initializer."""
    return helper.make_graph(
        [helper.make_node("MatMul", ["h", f"{name}_w"], [f"{name}_y"], f"{name}_mm")],
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_y", FLOAT, ["b", 4])],
        [weight(f"{name}_w", seed)],
    )


def loop_body() -> onnx.GraphProto:
    """One step: ``v <- v @ body_w``, the condition passed through."""
    return helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], "body_cond"),
            helper.make_node("MatMul", ["v", "body_w"], ["v_next"], "body_mm"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v", FLOAT, ["b", 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_next", FLOAT, ["b", 4]),
        ],
        [weight("body_w", 3)],
    )


def subgraph_model() -> onnx.ModelProto:
    """x -> mm_in -> h; If(cond) gives h @ then_w or h @ else_w; Loop applies body_w twice to
    h; their sum -> mm_out -> y."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w_in"], ["h"], "mm_in"),
            helper.make_node(
                "If",
                ["cond"],
                ["if_y"],
                "if",
                then_branch=branch("then", 1),
                else_branch=branch("else", 2),
            ),
            helper.make_node("Loop", ["trips", "", "h"], ["loop_y"], "loop", body=loop_body()),
            helper.make_node("Add", ["if_y", "loop_y"], ["s"], "add"),
            helper.make_node("MatMul", ["s", "w_out"], ["y"], "mm_out"),
        ],
        "subgraphs",
        [
            helper.make_tensor_value_info("x", FLOAT, ["b", 4]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", FLOAT, ["b", 4])],
        [
            weight("w_in", 0),
            weight("w_out", 4),
            numpy_helper.from_array(np.array(2, np.int64), "trips"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def batches() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        {"x": rng.standard_normal((n, 4)).astype(np.float32), "cond": np.array(n % 2 == 0)}
        for n in (3, 4, 5, 6)
    ]

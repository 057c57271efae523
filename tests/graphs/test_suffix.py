"""The downstream part of a model, run in ONNX Runtime on upstream values from the whole
model's run, gives the whole model's outputs; it holds only what lies downstream (and the
constants that feeds), reads outer-scope tensors of subgraphs as upstream inputs, and leaves out
the outputs that do not depend on its starting inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qcal_export.graphs.suffix import downstream_model, node_reads, upstream_reads

FLOAT = TensorProto.FLOAT


def branchy_model() -> onnx.ModelProto:
    """x -> Relu -> a; a * w (initializer) -> b; b + c (a Constant node's) -> d; If(flag) reads
    d from outer scope (then: d * 2, else: d) -> e; e + mask -> out; a side output of Relu."""
    then_branch = helper.make_graph(
        [helper.make_node("Mul", ["d", "two"], ["then_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["d"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", FLOAT, None)],
    )
    constant = numpy_helper.from_array(np.full((3,), 0.5, np.float32), "c_value")
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Mul", ["a", "w"], ["b"]),
        helper.make_node("Constant", [], ["c"], value=constant),
        helper.make_node("Add", ["b", "c"], ["d"]),
        helper.make_node("Not", ["flag"], ["not_flag"]),
        helper.make_node(
            "If", ["not_flag"], ["e"], then_branch=then_branch, else_branch=else_branch
        ),
        helper.make_node("Add", ["e", "mask"], ["out"]),
        helper.make_node("Neg", ["a"], ["side"]),
    ]
    graph = helper.make_graph(
        nodes,
        "branchy",
        [
            helper.make_tensor_value_info("x", FLOAT, [None, 3]),
            helper.make_tensor_value_info("mask", FLOAT, [None, 3]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("out", FLOAT, None),
            helper.make_tensor_value_info("side", FLOAT, None),
        ],
        initializer=[numpy_helper.from_array(np.array([1.0, -2.0, 3.0], np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, feed: dict, outputs: list[str]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, {i.name: feed[i.name] for i in session.get_inputs()})


def test_reads_of_an_if_are_its_condition_and_its_branches_outer_tensors():
    model = branchy_model()
    if_node = next(n for n in model.graph.node if n.op_type == "If")
    assert node_reads(if_node) == {"not_flag", "d"}


def test_the_downstream_of_the_flag_reads_d_from_upstream_and_gives_the_whole_outputs():
    model = branchy_model()
    assert upstream_reads(model, ["flag"]) == ["d"]
    suffix = downstream_model(model, ["flag"], {"d": FLOAT})
    assert [n.op_type for n in suffix.model.graph.node] == ["Not", "If", "Add"]
    assert suffix.outputs == ["out"]
    assert {i.name for i in suffix.model.graph.input} == {"flag", "mask", "d"}
    rng = np.random.default_rng(0)
    for flag in (True, False):
        feed = {
            "x": rng.normal(size=(2, 3)).astype(np.float32),
            "mask": rng.normal(size=(2, 3)).astype(np.float32),
            "flag": np.array(flag),
        }
        out, d = run(_with_output(model, "d"), feed, ["out", "d"])
        expected = (np.maximum(feed["x"], 0) * [1, -2, 3] + 0.5) * (1 if flag else 2)
        np.testing.assert_allclose(out, expected + feed["mask"], rtol=1e-6)
        (got,) = run(suffix.model, {**feed, "d": d}, ["out"])
        np.testing.assert_array_equal(got, out)


def test_a_start_at_the_top_keeps_the_whole_model_and_the_constants_it_reads():
    model = branchy_model()
    suffix = downstream_model(model, ["x", "flag"], {})
    assert suffix.fed == []
    assert len(suffix.model.graph.node) == len(model.graph.node)
    assert suffix.outputs == ["out", "side"]
    assert suffix.model.graph.node[0].op_type == "Constant"
    feed = {
        "x": np.array([[1.0, -1.0, 2.0]], np.float32),
        "mask": np.zeros((1, 3), np.float32),
        "flag": np.array(False),
    }
    out, side = run(suffix.model, feed, ["out", "side"])
    np.testing.assert_allclose(out, [[3.0, 1.0, 13.0]])
    np.testing.assert_array_equal(side, [[-1.0, -0.0, -2.0]])


def test_downstream_of_b_reads_the_constant_node_not_an_upstream_c():
    model = branchy_model()
    model.graph.input.append(helper.make_tensor_value_info("b_in", FLOAT, None))
    next(n for n in model.graph.node if n.op_type == "Add").input[0] = "b_in"
    suffix = downstream_model(model, ["b_in"], {"not_flag": TensorProto.BOOL})
    assert "Constant" in [n.op_type for n in suffix.model.graph.node]
    assert suffix.fed == ["not_flag"]


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.append(onnx.ValueInfoProto(name=name))
    return out

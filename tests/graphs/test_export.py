"""Graph bookkeeping around the QDQ export: new tensor and node names never collide with the
graph's, sort_nodes restores a topological order, and check_scales_match compares a scales file
with the plan.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from qdq_cases import (
    ATOL,
    FLOAT,
    RTOL,
    initializers,
    make_case,
    make_model,
    plan_and_scales,
    recipe_for,
    run,
    tensor_scales,
)

from qcal_export.errors import ModelError, ScalesError
from qcal_export.graphs.export import check_scales_match, export_qdq
from qcal_export.graphs.qdq import sort_nodes
from qcal_export.graphs.targets import find_targets
from qcal_export.spec.formats import FORMATS
from qcal_export.spec.recipe import Recipe

# names ------------------------------------------------------------------------------------------


def test_new_names_do_not_collide_with_existing_tensors():
    """The graph already holds ``x_scale``, ``w_quantized`` and a node ``x_QuantizeLinear``."""
    rng = np.random.default_rng(4)
    w = rng.normal(0, 1, (4, 3)).astype(np.float32)
    x_scale = np.full((1, 3), 2.0, np.float32)
    w_quantized = np.full((1, 3), -1.0, np.float32)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], "mm"),
            helper.make_node("Mul", ["h", "x_scale"], ["x_QuantizeLinear"], "x_QuantizeLinear"),
            helper.make_node("Add", ["x_QuantizeLinear", "w_quantized"], ["y"], "x_dequantized"),
        ],
        {"x": ["b", 4]},
        {"y": ["b", 3]},
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(x_scale, "x_scale"),
            numpy_helper.from_array(w_quantized, "w_quantized"),
        ],
    )
    x = rng.normal(0, 1, (2, 4)).astype(np.float32)
    plan = find_targets(model, Recipe(target="tensorrt"))
    scales = {
        "x": tensor_scales("x", "activation", "int8", x, None),
        "w": tensor_scales("w", "weight", "int8", w, 1),
    }
    qdq = export_qdq(model, plan, scales, "quantized").model
    names = [n.name for n in qdq.graph.node]
    assert len(set(names)) == len(names)
    inits = initializers(qdq)
    assert np.array_equal(numpy_helper.to_array(inits["x_scale"]), x_scale)
    assert np.array_equal(numpy_helper.to_array(inits["w_quantized"]), w_quantized)
    (y,) = run(qdq, {"x": x})
    fmt = FORMATS["int8"]
    xq = fmt.fake_quant(torch.from_numpy(x), scales["x"].scale, torch.tensor(0.0))
    wq = fmt.fake_quant(torch.from_numpy(w), scales["w"].scale.reshape(1, -1), torch.tensor(0.0))
    np.testing.assert_allclose(y, (xq @ wq).numpy() * 2.0 - 1.0, rtol=RTOL, atol=ATOL)


# sort_nodes -------------------------------------------------------------------------------------


def diamond_model() -> onnx.ModelProto:
    """x -> relu -> {mm_a, mm_b} -> add -> {sig, tanh} -> mul; an If that reads ``t`` only from
    inside its branches (outer scope)."""
    then_graph = helper.make_graph(
        [helper.make_node("Neg", ["t"], ["then_out"], "then_neg")],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", FLOAT, None)],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["t"], ["else_out"], "else_id")],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", FLOAT, None)],
    )
    rng = np.random.default_rng(7)
    return make_model(
        [
            helper.make_node("Relu", ["x"], ["r"], "relu"),
            helper.make_node("MatMul", ["r", "wa"], ["a"], "mm_a"),
            helper.make_node("MatMul", ["r", "wb"], ["b"], "mm_b"),
            helper.make_node("Add", ["a", "b"], ["s"], "add"),
            helper.make_node("Sigmoid", ["s"], ["g"], "sig"),
            helper.make_node("Tanh", ["s"], ["t"], "tanh"),
            helper.make_node("Mul", ["g", "t"], ["y"], "mul"),
            helper.make_node("Constant", [], ["flag"], "flag", value_float=1.0),
            helper.make_node("Cast", ["flag"], ["cond"], "cast", to=TensorProto.BOOL),
            helper.make_node(
                "If", ["cond"], ["z"], "if", then_branch=then_graph, else_branch=else_graph
            ),
        ],
        {"x": ["b", 4]},
        {"y": ["b", 4], "z": ["b", 4]},
        [
            numpy_helper.from_array(rng.normal(0, 1, (4, 4)).astype(np.float32), "wa"),
            numpy_helper.from_array(rng.normal(0, 1, (4, 4)).astype(np.float32), "wb"),
        ],
    )


@pytest.mark.parametrize("seed", range(8))
def test_sort_nodes_restores_topological_order(seed):
    model = diamond_model()
    x = np.random.default_rng(seed).normal(0, 1, (3, 4)).astype(np.float32)
    expected = run(model, {"x": x})
    nodes = list(model.graph.node)
    random.Random(seed).shuffle(nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    sort_nodes(model.graph)
    order = [n.name for n in model.graph.node]
    assert sorted(order) == sorted(n.name for n in nodes)
    position = {name: i for i, name in enumerate(order)}
    for before, after in [
        ("relu", "mm_a"), ("relu", "mm_b"), ("mm_a", "add"), ("mm_b", "add"), ("add", "sig"),
        ("add", "tanh"), ("sig", "mul"), ("tanh", "mul"), ("flag", "cast"), ("cast", "if"),
        ("tanh", "if"),  # read only inside the If's branches
    ]:  # fmt: skip
        assert position[before] < position[after], (before, after, order)
    onnx.checker.check_model(model, full_check=True)
    for got, want in zip(run(model, {"x": x}), expected, strict=True):
        assert np.array_equal(got, want)


def test_sort_nodes_keeps_an_ordered_graph_as_it_is_and_rejects_cycles():
    model = diamond_model()
    # independent nodes in a non-alphabetical, non-default order stay where they are
    nodes = list(model.graph.node)
    nodes[1], nodes[2] = nodes[2], nodes[1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    before = [n.name for n in model.graph.node]
    sort_nodes(model.graph)
    assert [n.name for n in model.graph.node] == before

    cyclic = helper.make_graph(
        [
            helper.make_node("Add", ["x", "q"], ["p"], "p"),
            helper.make_node("Relu", ["p"], ["q"], "q"),
        ],
        "cyclic",
        [helper.make_tensor_value_info("x", FLOAT, [2])],
        [helper.make_tensor_value_info("q", FLOAT, [2])],
    )
    with pytest.raises(ModelError, match="cycle"):
        sort_nodes(cyclic)


# check_scales_match -----------------------------------------------------------------------------


def test_check_scales_match():
    case = make_case("Gemm1")
    plan, scales, _ = plan_and_scales(case, recipe_for("int8", True))
    check_scales_match(plan, scales, "scales.safetensors")  # all there: no error

    missing = {"x": scales["x"]}
    with pytest.raises(ScalesError, match=r"scales\.safetensors") as e:
        check_scales_match(plan, missing, "scales.safetensors")
    assert "'w'" in str(e.value) and "weight" in str(e.value)

    wrong_format = dict(scales, x=tensor_scales("x", "activation", "fp8", case.x, None))
    with pytest.raises(ScalesError) as e:
        check_scales_match(plan, wrong_format, "s.safetensors")
    assert "'x'" in str(e.value) and "fp8" in str(e.value) and "int8" in str(e.value)

    wrong_axis = dict(scales, w=tensor_scales("w", "weight", "int8", case.w, 1))
    with pytest.raises(ScalesError) as e:
        check_scales_match(plan, wrong_axis, "s.safetensors")
    assert "'w'" in str(e.value) and "per-axis(1)" in str(e.value) and "per-axis(0)" in str(e.value)

    per_tensor = dict(scales, w=tensor_scales("w", "weight", "int8", case.w, None))
    with pytest.raises(ScalesError, match="'w'"):
        check_scales_match(plan, per_tensor, "s.safetensors")


def test_check_scales_match_checks_the_scale_shape_against_the_model():
    """Gemm1's weight is [6, 8]: per-axis(0) scales need shape [6]; a file made for another
    model's [5, 8] weight (same format and granularity) is refused before any export."""
    case = make_case("Gemm1")
    plan, scales, _ = plan_and_scales(case, recipe_for("int8", True))
    other = tensor_scales("w", "weight", "int8", case.w[:5], 0)
    with pytest.raises(ScalesError) as e:
        check_scales_match(plan, dict(scales, w=other), "s.safetensors")
    assert str(e.value) == (
        "s.safetensors: weight 'w': scale of shape [5], but per-axis(0) of this model's tensor "
        "needs [6]: recalibrate this model"
    )


def test_check_scales_match_refuses_scales_that_are_0_or_inf_in_a_float16_model():
    x = np.ones((2, 8), np.float16)
    m = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"], "mm")],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["b", 4])],
            [numpy_helper.from_array(np.ones((8, 4), np.float16), "w")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    plan = find_targets(m, Recipe())
    good = {
        "x": tensor_scales("x", "activation", "int8", x.astype(np.float32), None),
        "w": tensor_scales("w", "weight", "int8", np.ones((8, 4), np.float32), 1),
    }
    check_scales_match(plan, good, "s.safetensors")
    for value, found in ((1e-9, "1e-09 to 1e-09"), (1e5, "100000 to 100000")):
        bad = dict(good, x=dataclasses.replace(good["x"], scale=torch.tensor(value)))
        with pytest.raises(ScalesError) as e:
            check_scales_match(plan, bad, "s.safetensors")
        assert str(e.value) == (
            f"s.safetensors: activation 'x': scale (from {found}) is 0 or infinite as "
            "float16, the model's type: recalibrate this model"
        )

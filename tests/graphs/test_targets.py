"""find_targets, name_nodes and inspect on three-node graphs built with onnx.helper.

Each graph is small enough to read the expected plan off it by hand: which tensors are planned as
activations, which initializers as weights, on which channel axis, and for which node inputs.
The graphs are target_models.py's; the inputs find_targets skips or refuses are
test_targets_inputs.py's.
"""

from __future__ import annotations

import onnx
import pytest
from onnx import helper
from target_models import FLOAT, conv_model, gemm_model, matmul_model, model, weight

from qcal_export.errors import RecipeError
from qcal_export.graphs.inspect import quantizable_nodes
from qcal_export.graphs.targets import find_targets, name_nodes
from qcal_export.spec.plan import Use
from qcal_export.spec.recipe import Override, Recipe, TensorSpec

INT8_ACT = TensorSpec("int8")
INT8_CHANNEL = TensorSpec("int8", per_channel=True)
FP8_ACT = TensorSpec("fp8")
FP8_CHANNEL = TensorSpec("fp8", per_channel=True)


# weight axes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "axis"),
    [
        (lambda: matmul_model((4, 5)), 1),
        (lambda: matmul_model((2, 4, 5)), 2),
        (lambda: gemm_model(1), 0),
        (lambda: gemm_model(0), 1),
        (lambda: conv_model("Conv"), 0),
        (lambda: conv_model("ConvTranspose"), 1),
    ],
    ids=["matmul-rank2", "matmul-rank3", "gemm-transB1", "gemm-transB0", "conv", "convtranspose"],
)
def test_weight_axis_and_activation(build, axis):
    m = build()
    plan = find_targets(m, Recipe())
    node = m.graph.node[0].name
    assert list(plan.weights) == ["w"]
    w = plan.weights["w"]
    assert w.axis == axis
    assert w.spec == Recipe().weight and w.spec.per_channel
    assert w.uses == [Use(node, 1)]
    assert list(plan.activations) == ["x"]
    x = plan.activations["x"]
    assert x.uses == [Use(node, 0)] and x.elem_type == FLOAT and x.spec == Recipe().activation
    assert "bias" not in plan.weights and "bias" not in plan.activations
    assert plan.nodes == [node] and plan.excluded == []

    per_tensor = find_targets(m, Recipe(weight=TensorSpec("int8", per_channel=False)))
    assert per_tensor.weights["w"].axis is None
    assert per_tensor.weights["w"].spec.per_channel is False


def test_matmul_of_two_activations_plans_both_inputs_and_no_weight():
    m = model(
        [
            helper.make_node("Relu", ["a"], ["ra"], "relu"),
            helper.make_node("MatMul", ["ra", "b"], ["y"], "mm"),
        ],
        {"a": (FLOAT, ["n", 3, 4]), "b": (FLOAT, ["n", 4, 5])},
        {"y": (FLOAT, ["n", 3, 5])},
    )
    plan = find_targets(m, Recipe())
    assert plan.weights == {}
    assert sorted(plan.activations) == ["b", "ra"]
    assert plan.activations["ra"].uses == [Use("mm", 0)]
    assert plan.activations["b"].uses == [Use("mm", 1)]
    assert plan.nodes == ["mm"]


def test_tensor_read_by_three_matmuls_is_one_activation_with_three_uses():
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], f"mm{i}") for i in range(3)]
    m = model(
        nodes,
        {"x": (FLOAT, ["b", 4])},
        {f"y{i}": (FLOAT, ["b", 2 + i]) for i in range(3)},
        [weight(f"w{i}", (4, 2 + i)) for i in range(3)],
    )
    plan = find_targets(m, Recipe())
    assert list(plan.activations) == ["x"]
    assert plan.activations["x"].uses == [Use("mm0", 0), Use("mm1", 0), Use("mm2", 0)]
    assert sorted(plan.weights) == ["w0", "w1", "w2"]
    assert [plan.weights[f"w{i}"].uses for i in range(3)] == [[Use(f"mm{i}", 1)] for i in range(3)]
    assert plan.nodes == ["mm0", "mm1", "mm2"]


def test_weight_shared_by_two_nodes_is_one_weight_with_two_uses():
    m = model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], "mm_a"),
            helper.make_node("MatMul", ["h", "w"], ["y"], "mm_b"),
        ],
        {"x": (FLOAT, ["b", 4])},
        {"y": (FLOAT, ["b", 4])},
        [weight("w", (4, 4))],
    )
    plan = find_targets(m, Recipe())
    assert list(plan.weights) == ["w"]
    assert plan.weights["w"].uses == [Use("mm_a", 1), Use("mm_b", 1)]
    assert plan.weights["w"].axis == 1
    assert sorted(plan.activations) == ["h", "x"]


def test_weight_shared_with_different_axes_raises_naming_it():
    # MatMul wants axis 1 of w [4, 4], Gemm with transB=1 axis 0
    m = model(
        [
            helper.make_node("MatMul", ["x", "shared_w"], ["h"], "mm"),
            helper.make_node("Gemm", ["h", "shared_w"], ["y"], "gemm", transB=1),
        ],
        {"x": (FLOAT, ["b", 4])},
        {"y": (FLOAT, ["b", 4])},
        [weight("shared_w", (4, 4))],
    )
    with pytest.raises(RecipeError, match="'shared_w'") as e:
        find_targets(m, Recipe())
    assert "'mm'" in str(e.value) and "'gemm'" in str(e.value)
    # per tensor, both nodes want the same thing
    plan = find_targets(m, Recipe(weight=INT8_ACT))
    assert plan.weights["shared_w"].axis is None
    assert plan.weights["shared_w"].uses == [Use("mm", 1), Use("gemm", 1)]


def chain_model() -> onnx.ModelProto:
    """x -> enc/mm0 -> enc/mm1 -> head/gemm -> Conv-free chain of four quantizable nodes."""
    return model(
        [
            helper.make_node("MatMul", ["x", "w0"], ["h0"], "enc/mm0"),
            helper.make_node("MatMul", ["h0", "w1"], ["h1"], "enc/mm1"),
            helper.make_node("MatMul", ["h1", "w2"], ["h2"], "dec/mm2"),
            helper.make_node("Gemm", ["h2", "w3"], ["y"], "head/gemm", transB=1),
        ],
        {"x": (FLOAT, ["b", 4])},
        {"y": (FLOAT, ["b", 4])},
        [weight(f"w{i}", (4, 4)) for i in range(4)],
    )


def test_exclude_nodes_glob_and_exclude_op_types():
    m = chain_model()
    plan = find_targets(m, Recipe(exclude_nodes=("enc/*",)))
    assert plan.excluded == ["enc/mm0", "enc/mm1"]
    assert plan.nodes == ["dec/mm2", "head/gemm"]
    assert sorted(plan.weights) == ["w2", "w3"]
    assert sorted(plan.activations) == ["h1", "h2"]  # h1 feeds dec/mm2, x feeds only enc/mm0

    plan = find_targets(m, Recipe(exclude_op_types=("Gemm",), exclude_nodes=("*mm1",)))
    assert plan.excluded == ["enc/mm1", "head/gemm"]
    assert plan.nodes == ["enc/mm0", "dec/mm2"]
    assert sorted(plan.weights) == ["w0", "w2"]
    assert sorted(plan.activations) == ["h1", "x"]

    plan = find_targets(m, Recipe(op_types=("Gemm",)))
    assert plan.nodes == ["head/gemm"] and plan.excluded == []
    assert list(plan.weights) == ["w3"] and plan.weights["w3"].axis == 0


def test_overrides_by_node_pattern_first_match_wins():
    m = chain_model()
    recipe = Recipe(
        overrides=(
            Override(nodes="enc/*", activation=FP8_ACT, weight=FP8_CHANNEL),
            Override(nodes="head/*"),  # both None: left in float
            Override(nodes="*", op_types=("MatMul",), activation=None, weight=INT8_ACT),
        )
    )
    plan = find_targets(m, recipe)
    assert plan.nodes == ["enc/mm0", "enc/mm1", "dec/mm2"]
    assert plan.excluded == []
    assert {t: a.spec for t, a in plan.activations.items()} == {"x": FP8_ACT, "h0": FP8_ACT}
    assert {t: (w.spec, w.axis) for t, w in plan.weights.items()} == {
        "w0": (FP8_CHANNEL, 1),
        "w1": (FP8_CHANNEL, 1),
        "w2": (INT8_ACT, None),
    }
    assert "w3" not in plan.weights and "h2" not in plan.activations


def test_override_op_types_only_match_their_types():
    m = chain_model()
    recipe = Recipe(overrides=(Override(op_types=("Gemm",), activation=FP8_ACT, weight=None),))
    plan = find_targets(m, recipe)
    assert plan.activations["h2"].spec == FP8_ACT
    assert plan.activations["h1"].spec == Recipe().activation
    assert "w3" not in plan.weights
    assert plan.weights["w2"].spec == Recipe().weight


def test_conflicting_activation_specs_for_shared_tensor_raise_naming_it():
    m = model(
        [
            helper.make_node("MatMul", ["shared_x", "w0"], ["y0"], "a/mm"),
            helper.make_node("MatMul", ["shared_x", "w1"], ["y1"], "b/mm"),
        ],
        {"shared_x": (FLOAT, ["b", 4])},
        {"y0": (FLOAT, ["b", 4]), "y1": (FLOAT, ["b", 4])},
        [weight("w0", (4, 4)), weight("w1", (4, 4))],
    )
    recipe = Recipe(overrides=(Override(nodes="a/*", activation=FP8_ACT, weight=FP8_CHANNEL),))
    with pytest.raises(RecipeError, match="'shared_x'") as e:
        find_targets(m, recipe)
    assert "'a/mm'" in str(e.value) and "'b/mm'" in str(e.value)
    # leaving one consumer's activation in float is not a conflict
    recipe = Recipe(overrides=(Override(nodes="a/*", activation=None, weight=FP8_CHANNEL),))
    plan = find_targets(m, recipe)
    assert plan.activations["shared_x"].uses == [Use("b/mm", 0)]
    assert plan.weights["w0"].spec == FP8_CHANNEL


# name_nodes -------------------------------------------------------------------------------------


def test_name_nodes_names_unnamed_nodes_uniquely():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"], "Relu_0"),  # the name node 0 would get
        helper.make_node("Relu", ["b"], ["c"]),
        helper.make_node("Relu", ["c"], ["d"], "Relu_2_"),  # and the first fallback of node 2
        helper.make_node("Relu", ["d"], ["e"], "Relu_2"),
        helper.make_node("MatMul", ["e", "w"], ["y"]),
    ]
    m = model(nodes, {"x": (FLOAT, ["b", 4])}, {"y": (FLOAT, ["b", 3])}, [weight("w", (4, 3))])
    name_nodes(m)
    names = [n.name for n in m.graph.node]
    assert names[1] == "Relu_0" and names[3] == "Relu_2_" and names[4] == "Relu_2"
    assert all(names) and len(set(names)) == len(names)
    assert names[5] == "MatMul_5"
    before = list(names)
    name_nodes(m)  # idempotent
    assert [n.name for n in m.graph.node] == before
    plan = find_targets(m, Recipe())
    assert plan.nodes == ["MatMul_5"] and plan.weights["w"].uses == [Use("MatMul_5", 1)]


def test_quantizable_nodes_lists_rows_with_shapes_and_axes():
    m = gemm_model(1)
    m.graph.node[0].name = ""
    rows = quantizable_nodes(m)
    assert len(rows) == 1
    row = rows[0]
    assert (row.node, row.op_type, row.axis) == ("Gemm_0", "Gemm", "0")
    assert row.activations == ("x [bx4]",)
    assert row.weight == "w [5x4]"
    assert m.graph.node[0].name == ""  # the caller's model is not renamed


def test_quantizable_nodes_shows_an_unknown_rank_as_unknown_not_scalar():
    """paddle2onnx recognizers leave tensors of unknown rank after shape inference (no shape
    field); inspect printed them as ``scalar``. A dimension without value or name reads ``?``."""
    m = gemm_model(1)
    m.graph.input[0].type.tensor_type.ClearField("shape")
    assert quantizable_nodes(m)[0].activations == ("x [?]",)
    m = gemm_model(1)
    m.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    assert quantizable_nodes(m)[0].activations == ("x [?x4]",)

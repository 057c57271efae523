"""Which node inputs find_targets plans, skips or refuses, and why: integer, double and float16
inputs, a weight on MatMul's input 0, an initializer listed as a graph input, an already
quantized model. The graphs are target_models.py's, built with onnx.helper.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from target_models import FLOAT, matmul_model, model, weight

from qcal_export.errors import ModelError
from qcal_export.graphs.targets import find_targets, skipped_reasons
from qcal_export.spec.plan import Use
from qcal_export.spec.recipe import Recipe, TensorSpec


def test_integer_inputs_are_skipped():
    m = model(
        [
            helper.make_node("MatMul", ["xi", "wi"], ["yi"], "mm_int"),
            helper.make_node("MatMul", ["x", "w"], ["y"], "mm_float"),
            helper.make_node("Where", ["cond", "y", "other"], ["z"], "where"),
        ],
        {
            "xi": (TensorProto.INT32, ["b", 4]),
            "x": (FLOAT, ["b", 4]),
            "cond": (TensorProto.BOOL, ["b", 3]),
            "other": (FLOAT, ["b", 3]),
        },
        {"yi": (TensorProto.INT32, ["b", 3]), "z": (FLOAT, ["b", 3])},
        [weight("wi", (4, 3), np.int32), weight("w", (4, 3))],
    )
    plan = find_targets(m, Recipe(op_types=("MatMul", "Where"), target="tensorrt"))
    assert sorted(plan.activations) == ["other", "x", "y"]
    assert plan.activations["y"].uses == [Use("where", 1)]
    assert plan.activations["other"].uses == [Use("where", 2)]
    assert list(plan.weights) == ["w"]
    assert plan.nodes == ["mm_float", "where"]


def test_float16_activation_keeps_its_type():
    m = model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], "mm")],
        {"x": (TensorProto.FLOAT16, ["b", 4])},
        {"y": (TensorProto.FLOAT16, ["b", 3])},
        [weight("w", (4, 3), np.float16)],
    )
    plan = find_targets(m, Recipe())
    assert plan.activations["x"].elem_type == TensorProto.FLOAT16
    assert plan.weights["w"].axis == 1


def test_initializer_listed_as_a_graph_input_is_a_weight_with_a_note():
    m = matmul_model((4, 5))
    m.graph.input.append(helper.make_tensor_value_info("w", FLOAT, [4, 5]))
    plan = find_targets(m, Recipe())
    assert list(plan.weights) == ["w"] and list(plan.activations) == ["x"]
    assert plan.weights["w"].shape == (4, 5) and plan.weights["w"].elem_type == FLOAT
    assert plan.notes == [
        "weight initializer(s) ['w'] are also graph inputs (an export with "
        "keep_initializers_as_inputs): calibrated as constant weights; the quantized model no "
        "longer lists them as inputs"
    ]
    assert find_targets(matmul_model((4, 5)), Recipe()).notes == []


def test_nodes_with_nothing_to_quantize_say_why():
    """Double and int32 MatMuls, and a weight on input 0 under a weight-only recipe."""
    m = model(
        [
            helper.make_node("MatMul", ["xd", "wd"], ["yd"], "mm_double"),
            helper.make_node("MatMul", ["xi", "wi"], ["yi"], "mm_int"),
            helper.make_node("MatMul", ["w0", "x"], ["y"], "mm_weight_first"),
        ],
        {
            "xd": (TensorProto.DOUBLE, ["b", 4]),
            "xi": (TensorProto.INT32, ["b", 4]),
            "x": (FLOAT, [4, "n"]),
        },
        {
            "yd": (TensorProto.DOUBLE, ["b", 3]),
            "yi": (TensorProto.INT32, ["b", 3]),
            "y": (FLOAT, [3, "n"]),
        },
        [weight("wd", (4, 3), np.float64), weight("wi", (4, 3), np.int32), weight("w0", (3, 4))],
    )
    plan = find_targets(m, Recipe(activation=None, weight=TensorSpec("int4", block_size=4)))
    assert plan.weights == {} and plan.activations == {} and plan.nodes == []
    double = (
        "MatMul 'mm_double': it computes in double: ONNX QuantizeLinear takes float, float16 or "
        "bfloat16, not double: cast the model to float32 to quantize it"
    )
    weight_first = (
        "MatMul 'mm_weight_first': initializer 'w0' is input 0, but MatMul weights are "
        "quantized on input 1 only"
    )
    assert plan.skipped == {
        "mm_double": double,
        "mm_int": "MatMul 'mm_int': it computes in int32: ONNX QuantizeLinear takes float, "
        "float16 or bfloat16",
        "mm_weight_first": f"{weight_first}; the recipe leaves activations in float (input 1 'x')",
    }
    assert plan.notes[0] == double.replace("'mm_double':", "'mm_double' left in float:")
    assert plan.notes[2] == f"{weight_first.replace(':', ' left in float:', 1)}"
    assert skipped_reasons(plan, limit=1) == f"{double} (and 2 more node(s))"
    # int8 quantizes x and says that w0 stays float
    plan = find_targets(m, Recipe())
    assert list(plan.activations) == ["x"] and plan.weights == {}
    assert plan.nodes == ["mm_weight_first"]
    assert f"{weight_first}: that input stays float" in plan.notes


def test_already_quantized_model_raises():
    scale_zp = [
        numpy_helper.from_array(np.array(0.5, np.float32), "s"),
        numpy_helper.from_array(np.array(3, np.uint8), "zp"),
    ]
    dq = model(
        [
            helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["x"], "already_dq"),
            helper.make_node("MatMul", ["x", "w"], ["y"], "mm"),
        ],
        {"xq": (TensorProto.UINT8, ["b", 4])},
        {"y": (FLOAT, ["b", 3])},
        [*scale_zp, weight("w", (4, 3))],
    )
    with pytest.raises(ModelError, match="already quantized") as e:
        find_targets(dq, Recipe())
    assert "already_dq" in str(e.value)

    q = model(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], "mm"),
            helper.make_node("QuantizeLinear", ["y", "s", "zp"], ["yq"], "already_q"),
        ],
        {"x": (FLOAT, ["b", 4])},
        {"yq": (TensorProto.UINT8, ["b", 3])},
        [*scale_zp, weight("w", (4, 3))],
    )
    with pytest.raises(ModelError, match="already quantized") as e:
        find_targets(q, Recipe())
    assert "already_q" in str(e.value)

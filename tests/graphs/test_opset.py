"""Opsets of the exported QDQ model: export raises the opset only as far as the formats need, and
raise_opset converts the ops whose definition changed on the way (checked in ONNX Runtime).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from qdq_cases import ATOL, RTOL, broadcast, make_case, make_model, plan_and_scales, recipe_for, run

from qcal_export.graphs.export import export_qdq
from qcal_export.graphs.qdq import raise_opset
from qcal_export.spec.formats import FORMATS


@pytest.mark.parametrize(
    ("op", "opset", "fmt_name", "per_channel", "expected"),
    [
        ("Conv", 11, "int8", True, 13),  # per axis needs 13; Conv unchanged 11 -> 13
        ("Conv", 11, "int8", False, 11),  # per tensor int8 is fine at 11
        ("MatMul", 11, "uint8", True, 13),  # MatMul changed 9 -> 13: the converter runs
        ("Gemm1", 12, "int8", True, 13),
        ("ConvTranspose", 17, "fp8", False, 19),
        ("MatMul", 19, "fp8", True, 19),
        ("MatMul", 21, "int8", True, 21),
    ],
)
def test_opset_raised_only_as_far_as_needed(op, opset, fmt_name, per_channel, expected):
    case = make_case(op, opset=opset)
    fmt = FORMATS[fmt_name]
    plan, scales, axis = plan_and_scales(case, recipe_for(fmt_name, per_channel))
    result = export_qdq(case.model, plan, scales, "quantized")
    assert (result.opset_from, result.opset_to) == (opset, expected)
    assert [(e.domain, e.version) for e in result.model.opset_import] == [("", expected)]
    onnx.checker.check_model(result.model, full_check=True)
    (y,) = run(result.model, {"x": case.x})
    xq = fmt.fake_quant(torch.from_numpy(case.x), scales["x"].scale, scales["x"].zero_point)
    w = torch.from_numpy(case.w)
    w_zero_point = broadcast(scales["w"].zero_point, axis, w.ndim)
    wq = fmt.fake_quant(w, broadcast(scales["w"].scale, axis, w.ndim), w_zero_point)
    np.testing.assert_allclose(y, case.apply(xq, wq).numpy(), rtol=RTOL, atol=ATOL)


def reduce_mean_model(opset: int) -> onnx.ModelProto:
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], "mm"),
            helper.make_node("ReduceMean", ["h"], ["m"], "mean", axes=[1], keepdims=1),
            helper.make_node("Sub", ["h", "m"], ["y"], "center"),
        ],
        {"x": ["b", 4]},
        {"y": ["b", 5]},
        [numpy_helper.from_array(np.arange(20, dtype=np.float32).reshape(4, 5) / 10, "w")],
        opset,
    )


def test_raise_opset_converts_ops_that_changed():
    """ReduceMean took ``axes`` as an attribute until opset 18, as an input since."""
    model = reduce_mean_model(17)
    x = np.random.default_rng(6).normal(0, 1, (3, 4)).astype(np.float32)
    (before,) = run(model, {"x": x})
    raised = raise_opset(model, 19)
    assert raised.opset_import[0].version == 19
    assert raised.ir_version >= 9
    onnx.checker.check_model(raised, full_check=True)
    mean = next(n for n in raised.graph.node if n.op_type == "ReduceMean")
    assert len(mean.input) == 2 and not any(a.name == "axes" for a in mean.attribute)
    (after,) = run(raised, {"x": x})
    h = x @ (np.arange(20, dtype=np.float32).reshape(4, 5) / 10)
    np.testing.assert_allclose(before, h - h.mean(axis=1, keepdims=True), rtol=1e-5, atol=1e-5)
    assert np.array_equal(after, before)


def test_raise_opset_only_bumps_the_number_when_no_op_changed():
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], "mm"),
            helper.make_node("Relu", ["h"], ["y"], "relu"),
        ],
        {"x": ["b", 4]},
        {"y": ["b", 5]},
        [numpy_helper.from_array(np.ones((4, 5), np.float32), "w")],
    )
    graph_before = model.graph.SerializeToString()
    raised = raise_opset(model, 19)
    assert raised.opset_import[0].version == 19 and raised.ir_version >= 9
    assert raised.graph.SerializeToString() == graph_before
    onnx.checker.check_model(raised, full_check=True)
    x = np.arange(8, dtype=np.float32).reshape(2, 4) - 3
    (y,) = run(raised, {"x": x})
    np.testing.assert_array_equal(y, np.maximum(x @ np.ones((4, 5), np.float32), 0))

    same = raise_opset(raised, 13)  # already high enough: untouched
    assert same.opset_import[0].version == 19
    assert same.graph.SerializeToString() == graph_before

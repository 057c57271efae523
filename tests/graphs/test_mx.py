"""MX weights exported (graphs/mx.py): DequantizeLinear(block_size=32) of the elements with a
FLOAT8E8M0 scale, checked by onnx's checker, run by the ONNX reference evaluator and by ONNX
Runtime over the emulation that folds it, against the float64 brute force (mx_oracle.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from mx_oracle import K, N, brute_force, weight_cases
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qcal_export.graphs.fp4_emulation import runnable_form
from qcal_export.graphs.mx import quantize_weight_mx
from qcal_export.graphs.qdq import Names, sort_nodes
from qcal_export.spec.formats import SCALE_LIMITS
from qcal_export.spec.granularity import PerBlock
from qcal_export.spec.mx_formats import MXFP4, MXFP8
from qcal_export.spec.plan import Use, WeightPlan
from qcal_export.spec.recipe import TensorSpec
from qcal_export.spec.scales import QParams


def exported_weight_model(fmt, weight: np.ndarray, mode: str) -> onnx.ModelProto:
    """``y = x @ W`` with W [K, N] (float32 or float16) exported as ``fmt`` blocks along K,
    opset 24."""
    float_type = helper.np_dtype_to_tensor_dtype(weight.dtype)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", float_type, ["b", K])],
        [helper.make_tensor_value_info("y", float_type, ["b", N])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    granularity = PerBlock(0, 32)
    stat = granularity.groups(torch.from_numpy(weight).float()).abs().amax(-1)
    block_amax = granularity.unflatten(stat, granularity.stat_shape((K, N)))
    floor = SCALE_LIMITS[float_type][0]
    scale, zero_point = fmt.scale_zero_point(-block_amax, block_amax, floor)
    spec = TensorSpec(format=fmt.name)
    plan = WeightPlan("W", spec, granularity, [Use("mm", 1)], shape=(K, N), elem_type=float_type)
    q = QParams(fmt, scale, zero_point, granularity)
    quantize_weight_mx(model.graph, plan, q, mode, Names(model.graph))
    sort_nodes(model.graph)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("mode", ["quantized", "qdq"])
@pytest.mark.parametrize("fmt", [MXFP8, MXFP4], ids=lambda f: f.name)
def test_exported_weight_in_the_reference_evaluator_and_ort(fmt, mode):
    """x = I gives y = the dequantized W exactly (every other product is 0)."""
    weight = weight_cases(fmt.name)
    expected, exponents = brute_force(weight, fmt.name)
    model = exported_weight_model(fmt, weight, mode)
    types = {t.name: t.data_type for t in model.graph.initializer}
    scale = next(t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT8E8M0)
    assert list(scale.dims) == [3, N]
    np.testing.assert_array_equal(
        np.frombuffer(scale.raw_data, np.uint8), (exponents + 127).ravel()
    )
    assert (fmt.onnx_type in types.values()) == (mode == "quantized")
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    attributes = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attributes == {"axis": 0, "block_size": 32, "output_dtype": TensorProto.FLOAT}
    feed = {"x": np.eye(K, dtype=np.float32)}
    y = ReferenceEvaluator(model).run(None, feed)[0]
    np.testing.assert_array_equal(y.astype(np.float64), expected)
    emulated = runnable_form(model)
    assert emulated is not None and emulated is not model
    session = ort.InferenceSession(emulated.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, feed)[0].astype(np.float64), expected)


@pytest.mark.parametrize("mode", ["quantized", "qdq"])
@pytest.mark.parametrize("fmt", [MXFP8, MXFP4], ids=lambda f: f.name)
def test_a_float16_weight_dequantizes_to_float16_alike_everywhere(fmt, mode):
    """The DequantizeLinear writes the weight's float16; the evaluator, ORT over the emulation
    and the brute force (of the float16 weight, exponents at least -24 so that no scale is 0
    in float16, then cast) agree element for element."""
    weight = weight_cases(fmt.name).astype(np.float16)
    expected, _ = brute_force(weight.astype(np.float32), fmt.name, lowest=-24)
    model = exported_weight_model(fmt, weight, mode)
    feed = {"x": np.eye(K, dtype=np.float16)}
    y = ReferenceEvaluator(model).run(None, feed)[0]
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, expected.astype(np.float16))
    session = ort.InferenceSession(
        runnable_form(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    np.testing.assert_array_equal(session.run(None, feed)[0], y)

"""int16 and uint16 against ONNX: ``fake_quant`` / ``quantize`` equal QuantizeLinear ->
DequantizeLinear element for element, with ONNX Runtime (CPU) and with the reference evaluator
(onnx.reference), over the whole 16-bit range: ties at every magnitude, saturation, zero points;
and the scale and zero point of a range against float64. The stored integers are compared as
they are, the dequantized values by value: both runtimes dequantize a 0 to +0.0, where a
negative value that rounds to 0 gives -0.0 in ``fake_quant`` (the same number).

The models hold one QuantizeLinear -> DequantizeLinear pair with the scale and zero point as
initializers, at opset 21 (the first whose Q/DQ take 16-bit integers: 19 and 20 are refused by
onnx's checker and by ORT, which the last test shows).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from onnx.shape_inference import InferenceError

from qcal_export.graphs.qdq import required_opset
from qcal_export.spec.formats import INT8, INT16, UINT16, get_format
from qcal_export.spec.granularity import PerAxis, PerTensor

F32 = np.float32
FORMATS = {"int16": INT16, "uint16": UINT16}
NUMPY_TYPES = {"int16": np.int16, "uint16": np.uint16}
FLT_MAX = float(np.finfo(F32).max)
SPECIALS = [0.0, -0.0, np.inf, -np.inf, FLT_MAX, -FLT_MAX, 1e30, -1e30, 1e-45, -1e-45]
"""Values in x units (not scaled): infinities and far saturation, zeros, denormals."""
REFERENCE_LIMIT = 2.0**31
"""The reference evaluator casts ``rint(x / scale)`` to int32 before saturating: past this
quotient its cast overflows (ORT saturates), so the reference gets no such values."""
pytestmark = pytest.mark.filterwarnings(
    "ignore:overflow encountered in divide:RuntimeWarning",
    "ignore:invalid value encountered in cast:RuntimeWarning",
)  # numpy's words for that overflow in the reference evaluator


def qdq_model(name: str, shape: tuple[int, ...], scale, zero_point, axis, opset=21):
    fmt = FORMATS[name]
    scale = np.asarray(scale, F32)
    zero_point = np.asarray(zero_point).astype(NUMPY_TYPES[name])
    attrs = {} if axis is None else {"axis": axis}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["y"], **attrs),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [
            helper.make_tensor_value_info("q", fmt.onnx_type, list(shape)),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape)),
        ],
        initializer=[
            onnx.numpy_helper.from_array(scale, "scale"),
            onnx.numpy_helper.from_array(zero_point, "zero_point"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def onnx_qdq(name, x, scale, zero_point, axis):
    """(q, y) of ONNX Runtime and of the reference evaluator for the same model and ``x``."""
    model = qdq_model(name, x.shape, scale, zero_point, axis)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"x": np.ascontiguousarray(x, F32)}
    return session.run(None, feed), ReferenceEvaluator(model).run(None, feed)


def ours(name, x, scale, zero_point, axis):
    """(quantize, fake_quant) of the format with the scale broadcast along ``axis``."""
    fmt = FORMATS[name]
    granularity = PerTensor() if axis is None else PerAxis(axis)
    shape = granularity.broadcast_shape(x.shape)
    xt = torch.from_numpy(np.ascontiguousarray(x, F32))
    scale_t = torch.from_numpy(np.asarray(scale, F32)).reshape(shape)
    zero_t = torch.from_numpy(np.asarray(zero_point, F32)).reshape(shape)
    q = fmt.quantize(xt, scale_t, zero_t)
    assert q.dtype == fmt.storage_dtype
    return q.numpy(), fmt.fake_quant(xt, scale_t, zero_t).numpy()


def unit_values(name: str, rng: np.random.Generator) -> np.ndarray:
    """Values in units of the scale across the whole grid and past it: exact ties ``k + 0.5``
    at every magnitude, the integers at both ends, random values, far saturation."""
    span = 32768 if name == "int16" else 65536
    ties = np.concatenate([np.arange(-40, 40), np.arange(-span - 3, span + 3, 997)]) + 0.5
    ends = np.concatenate([np.arange(-span - 3, -span + 4), np.arange(span - 4, span + 3)])
    random = rng.uniform(-1.3 * span, 1.3 * span, 600)
    return np.concatenate([ties, ends, random, [-1e7, 1e7]]).astype(F32)


SCALES = {
    "pow2": np.array([0.25, 2.0**-12, 1.0, 2.0**-20], F32),
    "odd": np.array([0.0123, 3.7e-5, 1.3e-3, 7.9e-30], F32),
}
"""Power-of-two scales keep ``(k + 0.5) * scale`` an exact tie; others check both sides divide
(not multiply by 1 / scale); the last one is subnormal-adjacent."""
ZERO_POINTS = {"int16": [0, 0, 0, 0], "uint16": [32768, 0, 65535, 12345]}


def case(name: str, scales: np.ndarray, layout: str, seed: int = 0):
    """x ``[4, n]`` of each row in its channel's scale (specials appended), and the (scale,
    zero point, axis) of ``layout``: per tensor (the second scale) or per row (axis 0)."""
    units = unit_values(name, np.random.default_rng(seed))
    x = np.concatenate(
        [units[None] * scales[:, None], np.tile(np.array(SPECIALS, F32), (4, 1))], axis=1
    ).astype(F32)
    zero_points = np.array(ZERO_POINTS[name], F32)
    if layout == "per-tensor":
        return units * scales[1], scales[1], zero_points[3], None
    return x, scales, zero_points, 0


@pytest.mark.parametrize("layout", ["per-tensor", "axis0"])
@pytest.mark.parametrize("scales", list(SCALES))
@pytest.mark.parametrize("name", list(FORMATS))
def test_fake_quant_equals_onnxruntime_and_the_reference_evaluator(name, scales, layout):
    x, scale, zero_point, axis = case(name, SCALES[scales], layout)
    (q_ort, y_ort), (q_ref, y_ref) = onnx_qdq(name, x, scale, zero_point, axis)
    q, y = ours(name, x, scale, zero_point, axis)
    assert q_ort.dtype == NUMPY_TYPES[name]
    assert np.array_equal(q, q_ort)
    assert np.array_equal(y, y_ort) and not np.isnan(y_ort).any()
    with np.errstate(all="ignore"):
        quotient = np.abs(x / (scale if axis is None else scale[:, None]))
    inside = quotient < REFERENCE_LIMIT
    assert inside.mean() > 0.9
    assert np.array_equal(q[inside], q_ref[inside])
    assert np.array_equal(y[inside], y_ref[inside])


def test_ties_round_half_to_even_and_saturate_at_the_edges():
    """Hand-checked, scale 1: ties go to the even neighbour at both ends of the grid, then
    saturate; uint16 rounds ``x / scale`` before adding the zero point (an odd one too)."""
    x = np.array(
        [0.5, 1.5, 2.5, -0.5, -2.5, 32766.5, 32767.5, -32767.5, -32768.5, 32768, -40000, np.inf],
        F32,
    )
    expected = {
        ("int16", 0): [0, 2, 2, -0.0, -2, 32766, 32767, -32768, -32768, 32767, -32768, 32767],
        ("uint16", 32768): [0, 2, 2, 0, -2, 32766, 32767, -32768, -32768, 32767, -32768, 32767],
        ("uint16", 1): [0, 2, 2, 0, -1, 32766, 32768, -1, -1, 32768, -1, 65534],
    }
    for (name, zero_point), want in expected.items():
        _, y = ours(name, x, F32(1.0), F32(zero_point), None)
        assert y.tolist() == want, (name, zero_point)
        (_, y_ort), (_, y_ref) = onnx_qdq(name, x, F32(1.0), zero_point, None)
        assert np.array_equal(y, y_ort) and np.array_equal(y[:-1], y_ref[:-1])


def test_scale_and_zero_point_of_a_range_against_float64():
    rng = np.random.default_rng(5)
    lo = np.concatenate([-np.exp(rng.uniform(-30, 30, 200)), [0.0, -1.0, 0.0]]).astype(F32)
    hi = np.concatenate([np.exp(rng.uniform(-30, 30, 200)), [0.0, 65534.0, 32767.0]]).astype(F32)
    scale, zero_point = INT16.scale_zero_point(torch.from_numpy(lo), torch.from_numpy(hi))
    bound = np.maximum(-lo.astype(np.float64), hi)
    floor = np.float64(F32(1e-30))  # AMAX_FLOOR in float32: a zero range's amax
    want = np.where(bound == 0, floor, bound) / 32767
    assert np.array_equal(scale.numpy(), want.astype(F32))
    assert scale[-1] == 1.0 and not zero_point.any()
    scale, zero_point = UINT16.scale_zero_point(torch.from_numpy(lo), torch.from_numpy(hi))
    width = (hi.astype(np.float64) - lo).astype(F32).astype(np.float64)
    want = (np.where(width == 0, floor, width) / 65535).astype(F32)
    assert np.array_equal(scale.numpy(), want)
    want_zero = np.clip(np.rint(-(lo / want)), 0, 65535)
    assert np.array_equal(zero_point.numpy(), want_zero)
    assert (scale[-2], zero_point[-2]) == (1.0, 1.0)  # [-1, 65534]: 65535 steps of 1, zero at 1


def test_storage_types_and_opset():
    assert (INT16.qmin, INT16.qmax, UINT16.qmin, UINT16.qmax) == (-32768, 32767, 0, 65535)
    assert (INT16.onnx_type, UINT16.onnx_type) == (TensorProto.INT16, TensorProto.UINT16)
    assert (INT16.storage_dtype, UINT16.storage_dtype) == (torch.int16, torch.uint16)
    assert get_format("int16") is INT16 and get_format("uint16") is UINT16
    assert not INT16.weight_only and INT16.symmetric and not UINT16.symmetric
    assert required_opset([INT16, INT8], [PerTensor(), PerAxis(0)], {TensorProto.FLOAT}) == 21
    codes = UINT16.encode_zero_point(torch.tensor([65535.0, 0.0]))
    assert codes.dtype == torch.uint16 and codes.tolist() == [65535, 0]
    for opset, valid in ((20, False), (21, True)):
        model = qdq_model("int16", (3,), F32(0.5), 0, None, opset=opset)
        if valid:
            onnx.checker.check_model(model, full_check=True)
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            continue
        with pytest.raises(InferenceError, match=r"unsupported type: tensor\(int16\)"):
            onnx.checker.check_model(model, full_check=True)
        with pytest.raises(Exception, match="INVALID_GRAPH"):
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

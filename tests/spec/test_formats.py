"""Formats against ONNX Runtime: fake_quant / quantize equal QuantizeLinear -> DequantizeLinear.

The oracle is a real onnxruntime session (CPUExecutionProvider, opset 21) holding one
QuantizeLinear -> DequantizeLinear pair with the same scale and zero point; every comparison is
element for element, with no tolerance. The scale and zero point a format computes from a range
are test_formats_scales.py's.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

from qcal_export.errors import RecipeError
from qcal_export.spec.formats import FP8_E4M3, INT8, UINT8, get_format
from qcal_export.spec.granularity import PerAxis, PerTensor

FORMATS = {"int8": INT8, "uint8": UINT8, "fp8": FP8_E4M3}
CHANNELS = 5
POW2_SCALES = np.array([0.25, 2.0, 2.0**-7, 1.0, 16.0], np.float32)
"""Power-of-two scales: ``(k + 0.5) * scale`` divides back to an exact tie."""
ODD_SCALES = np.array([0.0123, 3.7, 0.91, 1.3e-3, 47.25], np.float32)
"""Scales that are not powers of two: checks both sides divide (not multiply by 1/scale)."""
UINT8_ZERO_POINTS = np.array([0, 255, 128, 37, 201], np.float32)
FLT_MAX = float(np.finfo(np.float32).max)


def ort_qdq(
    fmt, x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Run QuantizeLinear -> DequantizeLinear in ONNX Runtime; returns (q, x_dequantized).

    ``scale`` is float32 of shape [] (per tensor) or [C] (per axis, with ``axis``); the zero
    point is stored in the format's ONNX type (raw bytes, so FLOAT8E4M3FN works too). ``q`` of
    an FP8 format comes back as its raw bytes (uint8).
    """
    scale = np.asarray(scale, np.float32)
    zp_stored = torch.as_tensor(np.asarray(zero_point, np.float32)).to(fmt.storage_dtype)
    zp_raw = zp_stored.contiguous().view(torch.uint8).numpy().tobytes()
    initializers = [
        helper.make_tensor("scale", TensorProto.FLOAT, scale.shape, scale.tobytes(), raw=True),
        helper.make_tensor("zero_point", fmt.onnx_type, scale.shape, zp_raw, raw=True),
    ]
    attrs = {} if axis is None else {"axis": axis}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["y"], **attrs),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [
            helper.make_tensor_value_info("q", fmt.onnx_type, list(x.shape)),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape)),
        ],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q, y = session.run(None, {"x": np.ascontiguousarray(x, np.float32)})
    return q, y


def stored_bytes(q: torch.Tensor) -> np.ndarray:
    """The stored values as ONNX Runtime returns them: integers, or raw bytes for FP8."""
    if q.dtype == torch.float8_e4m3fn:
        return q.view(torch.uint8).numpy()
    return q.numpy()


def fp8_grid() -> np.ndarray:
    """All finite FP8 E4M3FN values, ascending, float32."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    return np.unique(values[np.isfinite(values)])


def q_unit_values(fmt, rng: np.random.Generator) -> np.ndarray:
    """Values in units of the scale: exact ties, grid points, random values, far saturation."""
    if fmt is FP8_E4M3:
        grid = fp8_grid()
        ties = (grid[:-1].astype(np.float64) + grid[1:]) / 2  # midpoints, exact in float32
        beyond = np.array([449, 455.99, 456, 456.01, 463.9, 464, 465, 480, 1000, 1e6])
        magnitudes = 2.0 ** rng.uniform(-12, 10, 300)
        signs = rng.choice([-1.0, 1.0], 300)
        parts = [grid, ties, beyond, -beyond, magnitudes * signs]
    else:
        ties = np.arange(-270, 270) + 0.5
        ints = np.arange(-270, 271, dtype=np.float64)
        parts = [ties, ints, rng.uniform(-300, 300, 300), rng.normal(0, 40, 300)]
    values = np.concatenate(parts).astype(np.float32)
    return values


SPECIALS = np.array(
    [0.0, -0.0, np.inf, -np.inf, FLT_MAX, -FLT_MAX, 1e30, -1e30, 1e-30, -1e-30, 1e-45, -1e-45],
    np.float32,
)
"""Values in x units (not scaled): infinities and far saturation, zeros, denormals."""

LAYOUTS = ["per-tensor", "axis0", "last-axis"]


def make_case(fmt, layout: str, scales: np.ndarray, seed: int = 0):
    """x of a 3-D shape, the granularity, ONNX axis, scale [] or [C] and zero point alike."""
    units = q_unit_values(fmt, np.random.default_rng(seed))
    zero_points = UINT8_ZERO_POINTS if fmt is UINT8 else np.zeros(CHANNELS, np.float32)
    if layout == "per-tensor":
        scale, zero_point = scales[0].reshape(()), zero_points[3].reshape(())
        row_scales = np.full(CHANNELS, scale, np.float32)
    else:
        scale, zero_point = scales, zero_points
        row_scales = scales
    rows = units[None, :] * row_scales[:, None]  # float32 products
    specials = np.tile(SPECIALS, (CHANNELS, 1))
    rows = np.concatenate([rows, specials], axis=1)
    if rows.shape[1] % 2:
        rows = np.concatenate([rows, rows[:, :1]], axis=1)
    x = rows.reshape(CHANNELS, 2, -1)
    if layout == "per-tensor":
        return x, PerTensor(), None, scale, zero_point
    if layout == "axis0":
        return x, PerAxis(0), 0, scale, zero_point
    return np.ascontiguousarray(x.transpose(1, 2, 0)), PerAxis(-1), -1, scale, zero_point


def torch_args(x, granularity, scale, zero_point):
    shape = granularity.broadcast_shape(x.shape)
    return (
        torch.from_numpy(x),
        torch.from_numpy(np.asarray(scale, np.float32)).reshape(shape),
        torch.from_numpy(np.asarray(zero_point, np.float32)).reshape(shape),
    )


@pytest.mark.parametrize("scales", [POW2_SCALES, ODD_SCALES], ids=["pow2-scale", "odd-scale"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(FORMATS))
def test_fake_quant_and_quantize_equal_onnxruntime(name, layout, scales):
    fmt = FORMATS[name]
    x, granularity, axis, scale, zero_point = make_case(fmt, layout, scales)
    assert np.isinf(x).sum() == 2 * CHANNELS  # the specials made it in, +inf and -inf per row
    q_ort, y_ort = ort_qdq(fmt, x, scale, zero_point, axis)
    xt, scale_t, zp_t = torch_args(x, granularity, scale, zero_point)

    q = fmt.quantize(xt, scale_t, zp_t)
    assert q.dtype == fmt.storage_dtype
    assert q.shape == x.shape
    assert np.array_equal(stored_bytes(q), q_ort)

    y = fmt.fake_quant(xt, scale_t, zp_t)
    assert y.dtype == torch.float32
    assert not np.isnan(y_ort).any()
    assert np.array_equal(y.numpy(), y_ort)


@pytest.mark.parametrize("name", list(FORMATS))
def test_ties_round_half_to_even(name):
    """Hand-checked ties: (k + 0.5) * scale goes to the even neighbour, like ORT."""
    fmt = FORMATS[name]
    scale = torch.tensor(0.25)
    zero = torch.tensor(0.0)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.5]) * scale
    got = fmt.fake_quant(x, scale, zero) / scale
    if fmt is FP8_E4M3:
        # Below 8 the e4m3 grid has steps of at most 0.5, so these are representable; 126.5
        # lies between 120 and 128 (step 8) and -127.5 too: both go to 128 (even mantissa).
        expected = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 128.0, -128.0]
    elif fmt is UINT8:
        expected = [0.0, 2.0, 2.0, 0.0, 0.0, 0.0, 126.0, 0.0]  # zero point 0: negatives clip
    else:
        expected = [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 126.0, -128.0]
    assert got.tolist() == expected
    q_ort, y_ort = ort_qdq(fmt, x.numpy(), scale.numpy(), zero.numpy(), None)
    assert np.array_equal(fmt.fake_quant(x, scale, zero).numpy(), y_ort)
    assert np.array_equal(stored_bytes(fmt.quantize(x, scale, zero)), q_ort)


@pytest.mark.parametrize("name", list(FORMATS))
def test_saturation(name):
    fmt = FORMATS[name]
    scale, zero = torch.tensor(0.5), torch.tensor(0.0)
    x = torch.tensor([1e9, -1e9, math.inf, -math.inf, FLT_MAX, -FLT_MAX])
    got = fmt.fake_quant(x, scale, zero)
    if fmt is FP8_E4M3:
        top, bottom = 448.0 * 0.5, -448.0 * 0.5
    else:
        top, bottom = fmt.qmax * 0.5, fmt.qmin * 0.5
    assert got.tolist() == [top, bottom] * 3
    _, y_ort = ort_qdq(fmt, x.numpy(), scale.numpy(), zero.numpy(), None)
    assert np.array_equal(got.numpy(), y_ort)


def test_format_constants():
    assert (INT8.qmin, INT8.qmax, INT8.onnx_type) == (-128, 127, TensorProto.INT8)
    assert (UINT8.qmin, UINT8.qmax, UINT8.onnx_type) == (0, 255, TensorProto.UINT8)
    assert (FP8_E4M3.qmax, FP8_E4M3.onnx_type) == (448.0, TensorProto.FLOAT8E4M3FN)
    assert INT8.symmetric and FP8_E4M3.symmetric and not UINT8.symmetric
    assert get_format("int8") is INT8 and get_format("fp8") is FP8_E4M3
    with pytest.raises(RecipeError, match="int3"):
        get_format("int3")


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("name", list(FORMATS))
def test_fake_quant_on_cuda_equals_cpu(name):
    fmt = FORMATS[name]
    x, granularity, _, scale, zero_point = make_case(fmt, "last-axis", ODD_SCALES)
    xt, scale_t, zp_t = torch_args(x, granularity, scale, zero_point)
    cpu = fmt.fake_quant(xt, scale_t, zp_t)
    cuda = fmt.fake_quant(xt.cuda(), scale_t.cuda(), zp_t.cuda())
    assert torch.equal(cuda.cpu(), cpu)
    q_cuda = fmt.quantize(xt.cuda(), scale_t.cuda(), zp_t.cuda()).cpu()
    assert np.array_equal(stored_bytes(q_cuda), stored_bytes(fmt.quantize(xt, scale_t, zp_t)))


# properties ---------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    name=st.sampled_from(["int8", "uint8"]),
    x=hnp.arrays(
        np.float32, st.integers(1, 64), elements=st.floats(-(2.0**100), 2.0**100, width=32)
    ),
    amin=st.floats(-(2.0**100), 0, width=32),
    amax=st.floats(0, 2.0**100, width=32),
)
def test_int_fake_quant_is_idempotent(name, x, amin, amax):
    fmt = FORMATS[name]
    scale, zero_point = fmt.scale_zero_point(torch.tensor(amin), torch.tensor(amax))
    once = fmt.fake_quant(torch.from_numpy(x), scale, zero_point)
    twice = fmt.fake_quant(once, scale, zero_point)
    assert torch.equal(once, twice)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(list(FORMATS)),
    x=hnp.arrays(np.float32, st.integers(1, 32), elements=st.floats(width=32, allow_nan=False)),
    scale=st.floats(2.0**-20, 2.0**20, width=32),
    zero_point=st.integers(0, 255),
)
def test_fake_quant_equals_onnxruntime_for_random_values(name, x, scale, zero_point):
    fmt = FORMATS[name]
    zp = float(zero_point) if fmt is UINT8 else 0.0
    q_ort, y_ort = ort_qdq(fmt, x, np.float32(scale), np.float32(zp), None)
    xt, scale_t, zp_t = torch.from_numpy(x), torch.tensor(scale), torch.tensor(zp)
    assert np.array_equal(stored_bytes(fmt.quantize(xt, scale_t, zp_t)), q_ort)
    assert np.array_equal(fmt.fake_quant(xt, scale_t, zp_t).numpy(), y_ort)

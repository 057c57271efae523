"""Formats against ONNX Runtime: fake_quant / quantize equal QuantizeLinear -> DequantizeLinear.

The oracle is a real onnxruntime session (CPUExecutionProvider, opset 21) holding one
QuantizeLinear -> DequantizeLinear pair with the same scale and zero point; every comparison is
element for element, with no tolerance.
"""

from __future__ import annotations

import math

import ml_dtypes
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
from qcal_export.formats import (
    AMAX_FLOOR,
    FP8_E4M3,
    INT8,
    NVFP4,
    SCALE_LIMITS,
    UINT8,
    get_format,
)
from qcal_export.granularity import PerAxis, PerTensor

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


# scale_zero_point by hand ------------------------------------------------------------------


def test_int8_scale_is_amax_over_127():
    amin = torch.tensor([-0.5, -3.0, -1.0, -254.0, 0.0])
    amax = torch.tensor([0.25, 1.0, 127.0, 3.0, 1e-3])
    scale, zero_point = INT8.scale_zero_point(amin, amax)
    bound = np.array([0.5, 3.0, 127.0, 254.0, 1e-3], np.float32)
    assert scale.dtype == torch.float32
    assert np.array_equal(scale.numpy(), bound / np.float32(127))
    assert scale[2].item() == 1.0 and scale[3].item() == 2.0
    assert zero_point.tolist() == [0.0] * 5


def test_fp8_scale_is_amax_over_448():
    amax = torch.tensor([448.0, 1.0, 896.0, 3.3])
    scale, zero_point = FP8_E4M3.scale_zero_point(-amax / 2, amax)
    assert np.array_equal(scale.numpy(), amax.numpy() / np.float32(448))
    assert scale[0].item() == 1.0 and scale[2].item() == 2.0
    assert zero_point.tolist() == [0.0] * 4
    # the bound is the larger magnitude, whichever side it is on
    scale, _ = FP8_E4M3.scale_zero_point(torch.tensor(-896.0), torch.tensor(1.0))
    assert scale.item() == 2.0


@pytest.mark.parametrize(
    ("amin", "amax", "scale", "zero_point"),
    [
        (-0.5, 254.5, 1.0, 0.0),  # -min/scale = 0.5: half to even -> 0
        (-1.5, 253.5, 1.0, 2.0),  # 1.5 -> 2
        (-2.5, 252.5, 1.0, 2.0),  # 2.5 -> 2
        (-127.5, 127.5, 1.0, 128.0),  # 127.5 -> 128
        (-1.0, 3.0, np.float32(4.0) / np.float32(255), 64.0),  # 63.75 -> 64
        (0.5, 2.0, np.float32(2.0) / np.float32(255), 0.0),  # extended down to 0
        (-2.0, -0.5, np.float32(2.0) / np.float32(255), 255.0),  # extended up to 0
        (-510.0, 0.0, 2.0, 255.0),
    ],
)
def test_uint8_scale_and_zero_point_by_hand(amin, amax, scale, zero_point):
    got_scale, got_zero_point = UINT8.scale_zero_point(torch.tensor(amin), torch.tensor(amax))
    assert got_scale.dtype == torch.float32
    assert got_scale.item() == float(np.float32(scale))
    assert got_zero_point.item() == zero_point
    # 0 is exactly representable
    assert UINT8.fake_quant(torch.tensor(0.0), got_scale, got_zero_point).item() == 0.0


@pytest.mark.parametrize("name", list(FORMATS))
def test_all_zero_range_gives_finite_positive_scale(name):
    fmt = FORMATS[name]
    zero = torch.zeros(3)
    scale, zero_point = fmt.scale_zero_point(zero, zero)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert (scale <= AMAX_FLOOR).all()  # a tiny floor, not something like 1.0
    assert torch.isfinite(zero_point).all()
    x = torch.tensor([0.0, 0.0, 0.0])
    assert fmt.fake_quant(x, scale, zero_point).tolist() == [0.0, 0.0, 0.0]


def test_uint8_scale_finite_for_full_float32_range():
    """Exposes a bug: ``(hi - lo)`` overflows float32 when the range is wider than FLT_MAX.

    formats.py IntFormat.scale_zero_point computes ``(hi - lo) / (qmax - qmin)``; for
    min = -3e38, max = 3e38 (both finite) that is inf / 255 = inf. ``hi / 255 - lo / 255``
    (≈ 2.35e36) stays finite.
    """
    scale, zero_point = UINT8.scale_zero_point(torch.tensor(-3e38), torch.tensor(3e38))
    assert torch.isfinite(scale).all(), f"scale {scale.item()} for a finite range"
    assert 0 <= zero_point.item() <= 255


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


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("name", list(FORMATS))
def test_scale_on_cuda_equals_cpu(name):
    """Exposes a bug on GPUs: ``bound / self.qmax`` (formats.py lines 64, 67 and 104) divides a
    CUDA tensor by a Python number, which PyTorch computes as ``bound * (1 / qmax)``; the
    scale is then 1 ulp off amax / qmax (what the CPU and ONNX Runtime use) for many amaxes,
    e.g. amax 7.682218 gives int8 scale 0.06048990413546562 on CUDA, 0.06048990786075592 on
    CPU."""
    fmt = FORMATS[name]
    generator = torch.Generator().manual_seed(0)
    amax = torch.rand(20000, generator=generator) * 10
    amin = -torch.rand(20000, generator=generator) * 3
    scale, zero_point = fmt.scale_zero_point(amin, amax)
    scale_cuda, zero_point_cuda = fmt.scale_zero_point(amin.cuda(), amax.cuda())
    assert torch.equal(zero_point_cuda.cpu(), zero_point)
    mismatches = int((scale_cuda.cpu() != scale).sum())
    assert mismatches == 0, f"{mismatches} of 20000 scales differ between CUDA and CPU"


# properties ---------------------------------------------------------------------------------

FINITE32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(["int8", "fp8"]), amin=FINITE32, amax=FINITE32)
def test_symmetric_scale_finite_positive_for_any_finite_range(name, amin, amax):
    scale, zero_point = FORMATS[name].scale_zero_point(torch.tensor(amin), torch.tensor(amax))
    assert math.isfinite(scale.item()) and scale.item() > 0
    assert zero_point.item() == 0


@settings(max_examples=200, deadline=None)
@given(
    amin=st.floats(-(2.0**123), 2.0**123, width=32),
    amax=st.floats(-(2.0**123), 2.0**123, width=32),
)
def test_uint8_scale_finite_positive_and_zero_point_in_range(amin, amax):
    scale, zero_point = UINT8.scale_zero_point(torch.tensor(amin), torch.tensor(amax))
    assert math.isfinite(scale.item()) and scale.item() > 0
    zp = zero_point.item()
    assert zp == round(zp) and 0 <= zp <= 255
    if amin <= 0 <= amax or amin > 0 or amax < 0:  # 0 is always exactly representable
        assert UINT8.fake_quant(torch.tensor(0.0), scale, zero_point).item() == 0.0


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


@pytest.mark.parametrize("name", ["int8", "uint8", "int4", "fp8"])
@pytest.mark.parametrize("amax", [1e-36, 1e-40, 1e-44])
def test_a_tiny_range_keeps_its_own_scale_floored_only_below_the_smallest_float32(name, amax):
    """amax / qmax in float32 as numpy computes it, or 2**-149 where that is 0: never the zero
    range's floor, never 0."""
    fmt = get_format(name)
    bound = np.float32(amax)
    scale, zero_point = fmt.scale_zero_point(torch.tensor(-bound), torch.tensor(bound))
    width, levels = (2 * bound, 255) if name == "uint8" else (bound, fmt.qmax)
    expected = np.maximum(np.float32(width) / np.float32(levels), np.float32(2.0**-149))
    assert scale.item() == expected > 0
    x = torch.tensor([bound, -bound / 2])
    assert (fmt.fake_quant(x, scale, zero_point) != 0).all()


def test_scale_limits_are_the_types_own():
    for elem_type, dtype in [
        (TensorProto.FLOAT, np.float32),
        (TensorProto.FLOAT16, np.float16),
        (TensorProto.BFLOAT16, ml_dtypes.bfloat16),
    ]:
        info = ml_dtypes.finfo(dtype)
        assert SCALE_LIMITS[elem_type] == (float(info.smallest_subnormal), float(info.tiny))


def test_nvfp4_global_scale_keeps_the_smallest_block_scale_positive():
    """Zero: the zero range's floor; a tiny amax: its own scale down to 2**-140, where the
    smallest FP8 block scale (2**-9) times it is the smallest float32, so blocks never
    dequantize with a 0 scale."""
    assert NVFP4.global_scale(0.0).item() == np.float32(AMAX_FLOOR) / np.float32(2688)
    assert NVFP4.global_scale(1e-36).item() == np.float32(np.float32(1e-36) / np.float32(2688))
    assert NVFP4.global_scale(1e-40).item() == 2.0**-140
    effective = NVFP4.effective_scales(
        torch.tensor(2.0**-9).to(torch.float8_e4m3fn), NVFP4.global_scale(1e-40)
    )
    assert effective.item() == 2.0**-149
    x = torch.full((1, 16), 1e-40)
    assert not torch.isnan(NVFP4.fake_quant(x, NVFP4.global_scale(1e-40), torch.zeros(()))).any()

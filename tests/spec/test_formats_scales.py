"""Formats' scale and zero point from a range: hand-computed values (amax / 127, amax / 448,
uint8's rounded zero point), the floors of zero and tiny ranges, the scale types' limits, and
properties (finite positive scales for any finite range).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from qcal_export.spec.formats import (
    AMAX_FLOOR,
    FP8_E4M3,
    INT8,
    NVFP4,
    SCALE_LIMITS,
    UINT8,
    get_format,
)

FORMATS = {"int8": INT8, "uint8": UINT8, "fp8": FP8_E4M3}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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

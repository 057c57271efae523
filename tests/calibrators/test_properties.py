"""Property tests (hypothesis) for every calibrator x format x granularity that is valid.

Small float32 tensors with zeros, constants, subnormals, huge and mixed-sign values: the amax is
finite and positive, max equals a float64 brute force, mse the oracle's sweep, fake-quantization
of the calibrated scale is idempotent. Merges and the MSE family: test_properties_mse.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from oracle import F32, fake_quant_oracle, oracle
from property_cases import (
    CASES,
    FLT_MAX,
    PLAIN,
    SHAPES,
    SUBNORMAL,
    arrays,
    block_scales,
    build,
    max_range,
    np_groups,
)

from qcal_export.calibrators import (
    mse_multipliers,
)
from qcal_export.spec.formats import AMAX_FLOOR, FP8_E4M3, INT8, NVFP4, UINT8
from qcal_export.spec.granularity import PerAxis, PerBlock, PerTensor
from qcal_export.spec.mx_formats import MXFP4, MXFP8

# 1. finite, positive amax and scale -----------------------------------------------------------


@pytest.mark.parametrize("method", list(CASES))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_amax_and_scale_are_finite_and_positive(method, data):
    fmt, granularity = data.draw(st.sampled_from(CASES[method]))
    x = data.draw(SHAPES.flatmap(arrays))
    cal = build(method, fmt, granularity, [x])
    shape = granularity.stat_shape(x.shape)
    amax = cal.compute_amax()
    assert tuple(amax.shape) == shape and amax.dtype == torch.float32
    assert torch.isfinite(amax).all() and (amax > 0).all()
    amin, amax = cal.compute_range()
    assert tuple(amin.shape) == tuple(amax.shape) == shape
    assert torch.isfinite(amin).all() and torch.isfinite(amax).all() and (amin <= amax).all()
    scale, zero_point = fmt.scale_zero_point(amin, amax)
    assert torch.isfinite(scale).all() and (scale > 0).all() and torch.isfinite(zero_point).all()
    if fmt is NVFP4 and isinstance(granularity, PerBlock):
        effective = block_scales(cal)
        assert torch.isfinite(effective).all() and (effective > 0).all()


# 2. brute force ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES["max"]), x=SHAPES.flatmap(arrays))
def test_max_equals_float64_brute_force_and_percentile_100(case, x):
    fmt, granularity = case
    groups = np_groups(x, granularity)
    lo, hi = np.minimum(groups.min(axis=1), 0.0), np.maximum(groups.max(axis=1), 0.0)
    if fmt.symmetric:
        lo, hi = np.minimum(lo, -hi), np.maximum(hi, -lo)
    cal = build("max", fmt, granularity, [x])
    amin, amax = (granularity.flatten(v).numpy() for v in cal.compute_range())
    assert np.array_equal(amin, lo.astype(F32)) and np.array_equal(amax, hi.astype(F32))
    bound = np.maximum(-lo, hi)
    expected = np.where(bound == 0, AMAX_FLOOR, bound).astype(F32)
    assert np.array_equal(granularity.flatten(cal.compute_amax()).numpy(), expected)
    everything = build("percentile", fmt, granularity, [x], percentile=100.0)
    (got_min, got_max), (want_min, want_max) = everything.compute_range(), cal.compute_range()
    assert torch.equal(got_min, want_min) and torch.equal(got_max, want_max)
    for got, want in zip(
        fmt.scale_zero_point(got_min, got_max),
        fmt.scale_zero_point(want_min, want_max),
        strict=True,
    ):
        assert torch.equal(got, want)


def clamped(fmt, x, amin, amax):
    """The oracle's fake-quantization of candidates clamped to float32's range, as
    MseCalibrator clamps them (``amax0 * 4`` overflows for amax0 near 3.4e38)."""
    with np.errstate(over="ignore"):
        return fake_quant_oracle(fmt, x, np.clip(amin, -FLT_MAX, 0), np.clip(amax, 0, FLT_MAX))


MSE_ORACLE_CASES = [(f, g) for f in (INT8, UINT8, FP8_E4M3) for g in (PerTensor(), PerAxis(0))]


@settings(max_examples=25, deadline=None)
@given(case=st.sampled_from(MSE_ORACLE_CASES), x=SHAPES.flatmap(arrays))
def test_mse_choice_is_the_oracle_minimum(case, x):
    """The chosen candidate has the smallest float64 oracle loss (up to summation order)."""
    fmt, granularity = case
    amin0, amax0 = max_range(fmt, granularity, [x])
    cal = build("mse", fmt, granularity, [x])
    _, _, losses = oracle(fmt, granularity, [x], amin0.numpy(), amax0.numpy(), quant=clamped)
    # The oracle's uint8 width ``hi - lo`` overflows for |min|, |max| near 3.4e38 (formats.py
    # splits it): no oracle there; test_amax_and_scale_are_finite_and_positive still covers it.
    assume(not np.isnan(losses).any())
    m = mse_multipliers().numpy()
    candidates = np.clip(amax0.numpy().astype(np.float64).reshape(-1, 1) * m, 0, FLT_MAX)
    candidates = candidates.astype(F32)  # [G, K]
    chosen = cal.compute_range()[1].numpy().reshape(-1, 1)
    best = np.where(candidates == chosen, losses, np.inf).min(axis=1)
    assert np.all(best <= losses.min(axis=1) * (1 + 1e-12))


# 4. fake-quant idempotent -------------------------------------------------------------------


@pytest.mark.parametrize("method", list(CASES))
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_fake_quant_of_the_calibrated_scale_is_idempotent(method, data):
    fmt, granularity = data.draw(st.sampled_from(CASES[method]))
    x = data.draw(SHAPES.flatmap(arrays))
    cal = build(method, fmt, granularity, [x])
    amin, amax = cal.compute_range()
    scale, zero_point = fmt.scale_zero_point(amin, amax)
    if fmt is NVFP4:
        groups = granularity.groups(torch.from_numpy(x))
        if isinstance(granularity, PerBlock):  # the block form: the calibrated FP8 scales
            effective = block_scales(cal)[:, None]
            once = fmt.fake_quant_blocks(groups, effective)
            assert torch.equal(fmt.fake_quant_blocks(once, effective), once)
            return
        x, scale, zero_point = groups.reshape(1, -1), scale.reshape(1), zero_point.reshape(1)
    else:
        x = torch.from_numpy(x)
        scale = granularity.expand(scale, tuple(x.shape))
        zero_point = granularity.expand(zero_point, tuple(x.shape))
    once = fmt.fake_quant(x, scale, zero_point)
    assert not torch.isnan(once).any()
    assert torch.equal(fmt.fake_quant(once, scale, zero_point), once)


def test_cases_cover_every_calibrator_and_format():
    from qcal_export.calibrators import CALIBRATORS

    assert set(CASES) == set(CALIBRATORS)
    assert {f.name for cases_ in CASES.values() for f, _ in cases_} == {
        f.name for f in (*PLAIN, NVFP4, MXFP8, MXFP4)
    }
    assert math.isfinite(FLT_MAX) and SUBNORMAL > 0

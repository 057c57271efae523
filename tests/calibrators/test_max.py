"""MaxCalibrator against numpy float64 abs-max and min/max, plus the calibrator contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from oracle import (
    GRANULARITIES,
    assert_merge_of_halves_equals_one_pass,
    export_shape,
    grouped,
    layout,
)

from qcal_export.calibrators.max import MaxCalibrator
from qcal_export.errors import CalibrationError
from qcal_export.spec.formats import AMAX_FLOOR, FP8_E4M3, INT8, UINT8
from qcal_export.spec.granularity import PerAxis, PerTensor

SYMMETRIC = {"int8": INT8, "fp8": FP8_E4M3}


def batches(seed: int = 0, channels: int = 6) -> list[np.ndarray]:
    """Three float32 batches [b, 7, C] of different b; channels scaled differently."""
    rng = np.random.default_rng(seed)
    gains = np.geomspace(0.01, 30.0, channels)
    return [
        (rng.standard_t(3, size=(b, 7, channels)) * gains + 0.3 * gains).astype(np.float32)
        for b in (4, 9, 2)
    ]


@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
@pytest.mark.parametrize("fmt_name", list(SYMMETRIC))
def test_symmetric_amax_is_float64_abs_max(fmt_name, gran_name):
    granularity = GRANULARITIES[gran_name]
    data = layout(batches(), gran_name)
    cal = MaxCalibrator(SYMMETRIC[fmt_name], granularity)
    for d in data:
        cal.collect(torch.from_numpy(d))
    expected = np.abs(grouped(data, granularity).astype(np.float64)).max(axis=1)
    amax = cal.compute_amax()
    assert amax.dtype == torch.float32
    assert tuple(amax.shape) == export_shape(granularity, 6)
    assert np.array_equal(amax.numpy().reshape(-1), expected.astype(np.float32))
    amin_, amax_ = cal.compute_range()
    assert torch.equal(amin_, -amax) and torch.equal(amax_, amax)
    assert cal.stat_shape == export_shape(granularity, 6)


@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
def test_asymmetric_range_is_min_max_extended_to_zero(gran_name):
    granularity = GRANULARITIES[gran_name]
    data = batches(seed=1)
    # channel 0 all positive, channel 1 all negative: the range must still include 0
    for d in data:
        d[..., 0] = np.abs(d[..., 0]) + 0.5
        d[..., 1] = -np.abs(d[..., 1]) - 0.5
    data = layout(data, gran_name)
    cal = MaxCalibrator(UINT8, granularity)
    for d in data:
        cal.collect(torch.from_numpy(d))
    values = grouped(data, granularity).astype(np.float64)
    expected_min = np.minimum(values.min(axis=1), 0.0).astype(np.float32)
    expected_max = np.maximum(values.max(axis=1), 0.0).astype(np.float32)
    amin, amax = cal.compute_range()
    shape = export_shape(granularity, 6)
    assert tuple(amin.shape) == shape and tuple(amax.shape) == shape
    assert np.array_equal(amin.numpy().reshape(-1), expected_min)
    assert np.array_equal(amax.numpy().reshape(-1), expected_max)
    if shape:
        assert amin[0].item() == 0.0 and amin[0] < amax[0]
        assert amax[1].item() == 0.0 and amin[1] < amax[1]
    expected_amax = np.maximum(-expected_min, expected_max)
    assert np.array_equal(cal.compute_amax().numpy().reshape(-1), expected_amax)


def test_half_precision_input_is_widened_exactly():
    x = torch.tensor([[0.1, -3.5, 2.0], [65504.0, -7.25, 0.0]], dtype=torch.float16)
    cal = MaxCalibrator(INT8, PerAxis(0))
    cal.collect(x)
    assert cal.compute_amax().tolist() == [3.5, 65504.0]
    cal = MaxCalibrator(UINT8, PerAxis(1))
    cal.collect(x.to(torch.bfloat16))
    amin, amax = cal.compute_range()
    assert amin.tolist() == [0.0, -7.25, 0.0]
    assert amax.tolist() == [65536.0, 0.0, 2.0]  # bfloat16(65504) is 65536


@pytest.mark.parametrize("granularity", [PerTensor(), PerAxis(1)], ids=["per-tensor", "axis1"])
def test_empty_tensor_is_a_no_op(granularity):
    cal = MaxCalibrator(INT8, granularity)
    cal.collect(torch.empty(0))
    cal.collect(torch.empty(3, 0))
    assert not cal.collected
    assert cal.compute_amax() is None and cal.compute_range() is None
    assert cal.state_dict() == {}
    x = torch.tensor([[1.0, -4.0], [2.5, 0.5]])
    cal.collect(x)
    before = cal.compute_amax().clone()
    cal.collect(torch.empty(0, 2))
    assert torch.equal(cal.compute_amax(), before)


@pytest.mark.parametrize("fmt", [INT8, UINT8, FP8_E4M3], ids=["int8", "uint8", "fp8"])
@pytest.mark.parametrize("granularity", [PerTensor(), PerAxis(0)], ids=["per-tensor", "axis0"])
def test_all_zero_input_gives_finite_positive_amax(fmt, granularity):
    cal = MaxCalibrator(fmt, granularity)
    cal.collect(torch.zeros(3, 8))
    amax = cal.compute_amax()
    assert torch.isfinite(amax).all() and (amax > 0).all()
    assert (amax <= AMAX_FLOOR).all()
    scale, zero_point = fmt.scale_zero_point(*cal.compute_range())
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.isfinite(zero_point).all()


@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
@pytest.mark.parametrize("fmt", [INT8, UINT8], ids=["int8", "uint8"])
def test_nonfinite_values_are_counted_and_skipped(fmt, gran_name):
    granularity = GRANULARITIES[gran_name]
    data = batches(seed=2)
    rng = np.random.default_rng(3)
    count = 0
    for i, d in enumerate(data):
        flat = d.reshape(-1)
        where = rng.choice(flat.size, size=3 + i, replace=False)
        flat[where] = [np.nan, np.inf, -np.inf, np.nan, -np.inf][: 3 + i]
        count += 3 + i
    data = layout(data, gran_name)
    cal = MaxCalibrator(fmt, granularity)
    for d in data:
        cal.collect(torch.from_numpy(d))
    assert cal.nonfinite_count == count
    values = grouped(data, granularity).astype(np.float64)
    finite = np.where(np.isfinite(values), values, 0.0)  # 0 is inside every range anyway
    amin, amax = cal.compute_range()
    if fmt.symmetric:
        bound = np.abs(finite).max(axis=1).astype(np.float32)
        assert np.array_equal(amax.numpy().reshape(-1), bound)
    else:
        assert np.array_equal(amin.numpy().reshape(-1), finite.min(axis=1).astype(np.float32))
        assert np.array_equal(amax.numpy().reshape(-1), finite.max(axis=1).astype(np.float32))
    assert torch.isfinite(cal.compute_amax()).all()


def test_nonfinite_error_raises_and_keeps_earlier_statistics():
    cal = MaxCalibrator(INT8, PerTensor(), nonfinite="error")
    cal.collect(torch.tensor([1.0, -2.0]))
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(CalibrationError, match="non-finite"):
            cal.collect(torch.tensor([100.0, bad]))
    assert cal.compute_amax().item() == 2.0
    assert cal.nonfinite_count == 0


def test_nonfinite_error_on_first_batch_leaves_nothing_collected():
    """Exposes a bug: a first collect() that raises still marks the calibrator as collected.

    calibrators/base.py Calibrator.collect initialises the state (zeros) before
    _drop_nonfinite raises, so compute_amax() returns AMAX_FLOOR (1e-30) instead of None
    although nothing was ever collected.
    """
    cal = MaxCalibrator(INT8, PerTensor(), nonfinite="error")
    with pytest.raises(CalibrationError):
        cal.collect(torch.tensor([1.0, math.nan]))
    assert cal.compute_amax() is None
    assert not cal.collected


def test_bad_nonfinite_option_is_rejected():
    with pytest.raises(CalibrationError, match="nonfinite"):
        MaxCalibrator(INT8, PerTensor(), nonfinite="ignore")


@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
@pytest.mark.parametrize("fmt", [INT8, UINT8, FP8_E4M3], ids=["int8", "uint8", "fp8"])
def test_merge_of_halves_equals_one_pass(fmt, gran_name):
    granularity = GRANULARITIES[gran_name]
    data = layout(batches(seed=4), gran_name)
    data[1].reshape(-1)[[3, 17]] = [np.nan, np.inf]
    whole = MaxCalibrator(fmt, granularity)
    first, second = MaxCalibrator(fmt, granularity), MaxCalibrator(fmt, granularity)
    assert_merge_of_halves_equals_one_pass(whole, first, second, data, nonfinite=2)
    assert torch.equal(first.state_dict()["numel"], whole.state_dict()["numel"])
    # merging into a fresh calibrator copies; merging an empty state changes nothing
    fresh = MaxCalibrator(fmt, granularity)
    fresh.merge_(whole.state_dict())
    fresh.merge_(MaxCalibrator(fmt, granularity).state_dict())
    assert torch.equal(fresh.compute_amax(), whole.compute_amax())


def test_merge_with_other_channel_count_raises():
    a, b = MaxCalibrator(INT8, PerAxis(0)), MaxCalibrator(INT8, PerAxis(0))
    a.collect(torch.ones(4, 3))
    b.collect(torch.ones(5, 3))
    with pytest.raises(CalibrationError):
        a.merge_(b.state_dict())
    assert a.compute_amax().tolist() == [1.0] * 4


def test_state_dict_is_a_copy():
    cal = MaxCalibrator(INT8, PerTensor())
    cal.collect(torch.tensor([3.0]))
    state = cal.state_dict()
    state["max"] += 100.0
    assert cal.compute_amax().item() == 3.0


def test_reset_forgets():
    cal = MaxCalibrator(INT8, PerAxis(0))
    cal.collect(torch.tensor([[100.0, float("nan")], [-50.0, 1.0]]))
    cal.reset()
    assert cal.compute_amax() is None and not cal.collected and cal.nonfinite_count == 0
    cal.collect(torch.tensor([[0.5, -0.25], [2.0, 1.0], [3.0, 0.0]]))  # other channel count
    assert cal.compute_amax().tolist() == [0.5, 2.0, 3.0]
    assert cal.stat_shape == (3,)


@pytest.mark.parametrize("axis", [0, -1])
def test_other_channel_count_raises(axis):
    cal = MaxCalibrator(INT8, PerAxis(axis))
    cal.collect(torch.ones(4, 2, 4))
    with pytest.raises(CalibrationError, match=r"\(4,\)"):
        cal.collect(torch.full((5, 2, 5), 9.0))
    assert cal.compute_amax().tolist() == [1.0] * 4  # the bad batch left no trace
    cal.collect(torch.full((4, 3, 4), 2.0))  # other sizes on other axes are fine
    assert cal.compute_amax().tolist() == [2.0] * 4


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=6),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    ),
    split=st.integers(0, 6),
)
def test_amax_equals_numpy_for_any_finite_data_and_split(x, split):
    cal = MaxCalibrator(INT8, PerAxis(-1))
    cal.collect(torch.from_numpy(x[:split]))
    cal.collect(torch.from_numpy(x[split:]))
    expected = np.abs(x.reshape(-1, x.shape[-1]).astype(np.float64)).max(axis=0)
    expected = np.where(expected == 0, AMAX_FLOOR, expected).astype(np.float32)
    amax = cal.compute_amax().numpy()
    assert np.array_equal(amax, expected)
    assert np.isfinite(amax).all() and (amax > 0).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nonfinite_skip_on_cuda_never_waits():
    """On CUDA, "skip" replaces non-finite values on the device and counts them there: a
    collect after the first never waits for the device; the range is that of the finite ones."""
    x = torch.randn(513, 77, device="cuda")
    x[7, ::3], x[::50, 2], x[100, 100 % 77] = torch.nan, torch.inf, -torch.inf
    cal = MaxCalibrator(UINT8, PerAxis(-1))
    cal.collect(x)
    torch.cuda.set_sync_debug_mode("error")
    try:
        cal.collect(x * 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    finite = torch.where(x.isfinite(), x, 0).cpu()
    both = torch.cat([finite, 2 * finite])
    amin, amax = cal.compute_range()
    assert torch.equal(amin.cpu().reshape(-1), both.amin(0))
    assert torch.equal(amax.cpu().reshape(-1), both.amax(0))
    assert cal.nonfinite_count == 2 * int((~x.isfinite()).sum())

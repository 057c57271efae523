"""The histogram state shared by the percentile and entropy calibrators, against a float64
oracle: exact counts with power-of-two widths, exact rebinning as the range grows, batches in
any order and merged states equal to one pass, fixed memory, per-axis groups, NaN skipped."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from histogram_oracle import collect_all, exponent_of, groups_of, histogram, make_batches
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qcal_export.calibrators import EntropyCalibrator, PercentileCalibrator
from qcal_export.calibrators.histogram import bin_exponent, rebin
from qcal_export.errors import CalibrationError
from qcal_export.spec.formats import AMAX_FLOOR, INT8, UINT8
from qcal_export.spec.granularity import PerAxis, PerBlock, PerTensor, PerTensorGroup

GRANULARITIES = {"per-tensor": PerTensor(), "axis0": PerAxis(0), "last-axis": PerAxis(-1)}
KINDS = ("normal", "student-t", "outliers", "spiky")


def assert_matches_oracle(cal, data, granularity, bins):
    counts, width, amin, amax = histogram(groups_of(data, granularity), bins)
    got_counts, got_width = cal.histogram()
    assert got_counts.dtype == torch.int64 and got_width.dtype == torch.float64
    assert np.array_equal(got_counts.numpy(), counts)
    assert np.array_equal(got_width.numpy(), width)
    got_min, got_max = cal.observed_range()
    assert np.array_equal(got_min.numpy(), amin.astype(np.float32))
    assert np.array_equal(got_max.numpy(), amax.astype(np.float32))


def layout(data, gran_name):
    if gran_name == "axis0":
        return [np.ascontiguousarray(np.moveaxis(d, -1, 0)) for d in data]
    return data


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
def test_counts_and_widths_equal_the_float64_oracle(kind, gran_name):
    granularity = GRANULARITIES[gran_name]
    data = layout(make_batches(kind, seed=1), gran_name)
    cal = collect_all(PercentileCalibrator(INT8, granularity, bins=64), data)
    assert_matches_oracle(cal, data, granularity, 64)
    counts, width = cal.histogram()
    assert int(counts.sum()) == sum(d.size for d in data)
    if gran_name != "per-tensor":
        assert len(set(width.tolist())) > 3  # each channel has its own width


def test_width_is_the_smallest_power_of_two_covering_the_range():
    absmax = torch.tensor([0.0, 1e-45, 1.0, 2047.0, 2048.0, 2048.5, 3.0e38, 1e-30, 5.0])
    got = bin_exponent(absmax, 2048).tolist()
    assert got == [exponent_of(float(a), 2048) for a in absmax.double()]
    assert got[:6] == [-126, -126, -10, 0, 1, 1]  # 2048 * 2**-11 == 1 is not > 1
    assert bin_exponent(torch.tensor([5.0, 6.0]), 3).tolist() == [1, 2]  # 3*2 > 5, 3*2 <= 6


def test_values_on_bin_edges_land_in_the_bin_they_start():
    x = torch.tensor([-3.5, -3.0, -0.5, -0.0, 0.0, 0.25, 0.5, 3.0, 3.75])  # width 0.5 for 8 bins
    cal = PercentileCalibrator(INT8, PerTensor(), bins=8)
    cal.collect(x)
    counts, width = cal.histogram()
    assert width.tolist() == [0.5]
    expected = torch.zeros(16, dtype=torch.int64)
    for v in x.tolist():
        expected[math.floor(v / 0.5) + 8] += 1
    assert torch.equal(counts[0], expected)
    assert counts[0, 1] == 1 and counts[0, 7] == 1 and counts[0, 8] == 3 and counts[0, 15] == 1


@pytest.mark.parametrize("gran_name", ["per-tensor", "last-axis"])
def test_batches_in_any_order_give_the_one_pass_histogram(gran_name):
    granularity = GRANULARITIES[gran_name]
    data = make_batches("outliers", seed=2)
    whole = PercentileCalibrator(INT8, granularity, bins=32)
    whole.collect(torch.from_numpy(np.concatenate(data)))
    for order in itertools.permutations(range(len(data))):
        cal = collect_all(
            PercentileCalibrator(INT8, granularity, bins=32), [data[i] for i in order]
        )
        for got, expected in zip(cal.histogram(), whole.histogram(), strict=True):
            assert torch.equal(got, expected)
    assert_matches_oracle(whole, data, granularity, 32)


@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
@pytest.mark.parametrize("cls", [PercentileCalibrator, EntropyCalibrator])
def test_merged_states_equal_one_pass(cls, gran_name):
    granularity = GRANULARITIES[gran_name]
    data = layout(make_batches("student-t", seed=3), gran_name)
    data[2].reshape(-1)[[5, 11]] = [np.nan, -np.inf]
    whole = collect_all(cls(UINT8, granularity, bins=64), data)
    small = collect_all(cls(UINT8, granularity, bins=64), data[:2])  # the narrow range
    large = collect_all(cls(UINT8, granularity, bins=64), data[2:])  # the wide range
    assert not torch.equal(small.state_dict()["exponent"], large.state_dict()["exponent"])
    for first, second in ((small, large), (large, small)):
        merged = cls(UINT8, granularity, bins=64)
        merged.merge_(first.state_dict())
        merged.merge_(second.state_dict())
        merged.merge_({})
        for key, value in whole.state_dict().items():
            assert torch.equal(merged.state_dict()[key], value), key
        assert merged.nonfinite_count == 2
        for got, expected in zip(merged.compute_range(), whole.compute_range(), strict=True):
            assert torch.equal(got, expected)


def test_merge_that_does_not_fit_raises_and_changes_nothing():
    a = collect_all(PercentileCalibrator(INT8, PerAxis(0), bins=16), [np.ones((4, 3), np.float32)])
    b = collect_all(PercentileCalibrator(INT8, PerAxis(0), bins=16), [np.ones((5, 3), np.float32)])
    c = collect_all(PercentileCalibrator(INT8, PerAxis(0), bins=32), [np.ones((4, 3), np.float32)])
    before = a.state_dict()
    for other in (b, c):
        with pytest.raises(CalibrationError, match="merge"):
            a.merge_(other.state_dict())
        for key, value in before.items():
            assert torch.equal(a.state_dict()[key], value)


def test_rebin_moves_counts_exactly():
    hist = torch.arange(16, dtype=torch.int64).reshape(1, 16)  # 8 bins a side
    moved = rebin(hist.repeat(3, 1), torch.tensor([0, 1, 70]))
    assert torch.equal(moved[0], hist[0])
    signed = torch.arange(-8, 8)
    expected = torch.zeros(16, dtype=torch.int64).index_add_(0, (signed >> 1) + 8, hist[0])
    assert torch.equal(moved[1], expected)
    assert moved[2].tolist() == [0] * 7 + [sum(range(8)), sum(range(8, 16))] + [0] * 7


def test_memory_stays_fixed_as_the_range_grows():
    rng = np.random.default_rng(4)
    cal = PercentileCalibrator(INT8, PerAxis(1), bins=128)
    data = []
    for scale in (1e-3, 1e-1, 1.0, 1e2, 1e4, 1e6):
        data.append((rng.normal(size=(40, 5)) * scale).astype(np.float32))
        cal.collect(torch.from_numpy(data[-1]))
        state = cal.state_dict()
        assert state["hist"].shape == (5, 256) and state["exponent"].shape == (5,)
    assert_matches_oracle(cal, data, PerAxis(1), 128)


@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
def test_nonfinite_values_are_counted_and_left_out(gran_name):
    granularity = GRANULARITIES[gran_name]
    data = layout(make_batches("normal", seed=5), gran_name)
    rng = np.random.default_rng(6)
    for d in data:
        flat = d.reshape(-1)
        flat[rng.choice(flat.size, 4, replace=False)] = [np.nan, np.inf, -np.inf, np.nan]
    cal = collect_all(PercentileCalibrator(INT8, granularity, bins=64), data)
    assert cal.nonfinite_count == 4 * 4
    assert_matches_oracle(cal, data, granularity, 64)
    assert int(cal.histogram()[0].sum()) == sum(d.size for d in data) - 16


def test_all_nonfinite_group_has_an_empty_histogram_and_a_floored_range():
    x = torch.tensor([[np.nan, np.inf], [1.0, -2.0]])
    for cal in (
        PercentileCalibrator(UINT8, PerAxis(0), bins=16),
        EntropyCalibrator(UINT8, PerAxis(0), bins=16, quantized_bins=4),
    ):
        cal.collect(x)
        counts, _ = cal.histogram()
        assert counts[0].sum() == 0 and counts[1].sum() == 2
        amin, amax = cal.compute_range()
        assert amin[0] == 0 and amax[0] == 0 and amax[1] > 0 > amin[1]


def test_nonfinite_error_raises_before_anything_is_counted():
    cal = PercentileCalibrator(INT8, PerTensor(), nonfinite="error")
    cal.collect(torch.tensor([1.0, -2.0]))
    with pytest.raises(CalibrationError, match="non-finite"):
        cal.collect(torch.tensor([100.0, np.nan]))
    assert int(cal.histogram()[0].sum()) == 2 and cal.compute_amax().item() == 2.0


def test_zero_and_empty_tensors():
    cal = PercentileCalibrator(INT8, PerTensor(), bins=16)
    cal.collect(torch.empty(0, 3))
    assert not cal.collected and cal.histogram() is None and cal.compute_amax() is None
    cal.collect(torch.zeros(4, 3))
    counts, width = cal.histogram()
    assert counts[0, 16] == 12 and counts.sum() == 12 and width.tolist() == [2.0**-126]
    assert 0 < cal.compute_amax() <= AMAX_FLOOR


def test_extreme_magnitudes_match_the_oracle():
    x = np.array([3.0e38, -3.4e38, 1e-45, -1e-40, 1.0, 0.0], dtype=np.float32)
    tiny = np.array([1e-45, -3e-45, 1e-40, 0.0], dtype=np.float32)
    for data in ([x], [tiny], [tiny, x]):
        cal = collect_all(PercentileCalibrator(INT8, PerTensor(), bins=2), data)
        assert_matches_oracle(cal, data, PerTensor(), 2)


@pytest.mark.parametrize("bins", [1, 0, 2.5, True, "64", None])
def test_bad_bins_are_rejected(bins):
    for cls in (PercentileCalibrator, EntropyCalibrator):
        with pytest.raises(CalibrationError, match="bins"):
            cls(INT8, PerTensor(), bins=bins)


def test_integral_float_bins_from_a_recipe_are_accepted():
    assert PercentileCalibrator(INT8, PerTensor(), bins=512.0).bins == 512


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=8),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    ),
    split=st.integers(0, 8),
    bins=st.integers(2, 40),
)
def test_any_finite_data_and_split_matches_the_oracle(x, split, bins):
    data = [x[:split], x[split:]]
    cal = collect_all(PercentileCalibrator(INT8, PerAxis(-1), bins=bins), data)
    assert_matches_oracle(cal, data, PerAxis(-1), bins)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_histogram_equals_cpu():
    data = make_batches("outliers", seed=7)
    cpu = collect_all(EntropyCalibrator(UINT8, PerAxis(-1)), data)
    gpu = EntropyCalibrator(UINT8, PerAxis(-1))
    for d in data:
        gpu.collect(torch.from_numpy(d).cuda())
    assert gpu.state_dict()["hist"].is_cuda
    for key, value in cpu.state_dict().items():
        assert torch.equal(gpu.state_dict()[key].cpu(), value), key
    for got, expected in zip(gpu.compute_range(), cpu.compute_range(), strict=True):
        assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize(
    "granularity", [PerBlock(-1, 4), PerTensorGroup(-1, 4)], ids=["per-block", "tensor-group"]
)
def test_padding_of_a_partial_last_block_is_not_counted(granularity):
    x = np.random.default_rng(8).normal(size=(5, 6)).astype(np.float32)
    x[1, 5] = np.nan
    cal = collect_all(PercentileCalibrator(INT8, granularity, bins=16), [x])
    if isinstance(granularity, PerBlock):
        rows = [r for row in x for r in (row[:4], row[4:])]
    else:
        rows = [x.reshape(-1)]
    counts, width, _, _ = histogram([r[np.isfinite(r)].astype(np.float64) for r in rows], 16)
    assert np.array_equal(cal.histogram()[0].numpy(), counts)
    assert np.array_equal(cal.histogram()[1].numpy(), width)
    assert int(cal.histogram()[0].sum()) == 29 and cal.nonfinite_count == 1

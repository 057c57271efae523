"""What a report keeps of an activation's calibration (calibrate/detail.py): the compact
histogram against a float64 brute-force count (of the sample taken, which covers every position
of a batch), the MSE losses against a float64 sweep, and the bounds on both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcal_export.calibrate.detail import (
    MAX_CANDIDATES,
    REPORT_BINS,
    SAMPLE_VALUES,
    DetailHistogram,
    compact_histogram,
    detail_calibrators,
    mse_loss,
    sample_step,
    seen_range,
)
from qcal_export.calibrators.hist_mse import HistogramMseCalibrator
from qcal_export.calibrators.max import MaxCalibrator
from qcal_export.calibrators.mse import MseCalibrator
from qcal_export.calibrators.percentile import PercentileCalibrator
from qcal_export.spec.formats import get_format
from qcal_export.spec.granularity import PerAxis, PerTensor
from qcal_export.spec.recipe import TensorSpec


def _batches(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(40, 50, generator=gen) * s + 0.5 for s in (1.0, 3.0, 0.2)]


def _brute_counts(values: np.ndarray, hist: dict) -> np.ndarray:
    """Counts of ``values`` in the bins ``[low + i width, low + (i + 1) width)``, float64."""
    index = np.floor((values.astype(np.float64) - hist["low"]) / hist["width"]).astype(int)
    assert index.min() >= 0 and index.max() < len(hist["counts"])
    return np.bincount(index, minlength=len(hist["counts"]))


@pytest.mark.parametrize("bins", [64, 2048])
def test_compact_histogram_counts_every_value_in_its_bin(bins):
    cal = DetailHistogram(get_format("int8"), PerTensor(), bins=bins)
    batches = _batches()
    for x in batches:
        cal.collect(x)
    hist = compact_histogram(cal)
    values = torch.cat([b.reshape(-1) for b in batches]).numpy()
    assert len(hist["counts"]) <= REPORT_BINS
    assert hist["low"] <= values.min() and values.max() < hist["low"] + hist["width"] * len(
        hist["counts"]
    )
    np.testing.assert_array_equal(hist["counts"], _brute_counts(values, hist))
    assert (hist["min"], hist["max"], hist["values"]) == (values.min(), values.max(), values.size)


def test_a_large_batch_is_sampled_at_every_position_and_its_range_kept_whole():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 96, 384, generator=gen)
    x[5, 7, 100] = 50.0  # an outlier the sample may miss: the range keeps it
    x[0, 0, 3] = -9.0
    cal = DetailHistogram(get_format("int8"), PerTensor(), bins=1024)
    cal.collect(x)
    whole = MaxCalibrator(get_format("int8"), PerTensor())  # the tensor's own calibrator
    whole.collect(x)
    step = sample_step(tuple(x.shape))
    sample = x.reshape(-1)[::step]
    assert step > 1 and len(sample) <= SAMPLE_VALUES
    columns = torch.arange(x.numel())[::step] % 384
    assert len(set(columns.tolist())) == 384  # every channel sampled
    hist = compact_histogram(cal, seen_range(whole))
    np.testing.assert_array_equal(hist["counts"], _brute_counts(sample.numpy(), hist))
    assert (hist["min"], hist["max"], hist["values"]) == (-9.0, 50.0, x.numel())


def test_sample_steps_are_coprime_with_a_sample_size():
    for shape in [(16, 128, 384), (16, 12, 128, 128), (3, 1000003), (65536,), (1, 2, 3)]:
        step = sample_step(shape)
        assert np.prod(shape) / step <= SAMPLE_VALUES + 1
        assert step == 1 or np.gcd(step, int(np.prod(shape[1:]))) == 1, shape


def test_compact_histogram_sums_groups_of_other_widths():
    cal = PercentileCalibrator(get_format("int8"), PerAxis(0), bins=64)
    x = torch.randn(3, 500, generator=torch.Generator().manual_seed(1))
    x = x * torch.tensor([[0.01], [1.0], [40.0]])
    cal.collect(x)
    hist = compact_histogram(cal)
    np.testing.assert_array_equal(hist["counts"], _brute_counts(x.reshape(-1).numpy(), hist))


def test_compact_histogram_none_before_collect():
    assert compact_histogram(DetailHistogram(get_format("int8"), PerTensor(), bins=64)) is None


def _mse_brute(values: np.ndarray, amax: float, qmax: int) -> float:
    """Mean squared error of symmetric integer QDQ at ``amax``, float64 (round half to even)."""
    scale = np.float64(np.float32(np.float32(amax) / np.float32(qmax)))
    q = np.clip(np.rint(values / scale), -qmax - 1, qmax) * scale
    return float(np.mean((q - values) ** 2))


def test_mse_loss_matches_a_float64_sweep_and_the_decision():
    fmt = get_format("int8")
    batches = _batches(2)
    values = torch.cat([b.reshape(-1) for b in batches])
    cal = MseCalibrator(fmt, PerTensor(), amax0=values.abs().max(), start=0.3, step=0.05)
    for x in batches:
        cal.collect(x)
    loss = mse_loss(cal)
    assert len(loss["amax"]) == len(cal.multipliers) <= MAX_CANDIDATES
    best = loss["best"]
    assert loss["amax"][best] == pytest.approx(float(cal.compute_amax()), rel=1e-6)
    assert loss["mse"][best] == min(loss["mse"])
    brute = [_mse_brute(values.double().numpy(), a, fmt.qmax) for a in loss["amax"]]
    np.testing.assert_allclose(loss["mse"], brute, rtol=1e-4)


def test_hist_mse_loss_keeps_the_best_of_many_candidates():
    fmt = get_format("int8")
    cal = HistogramMseCalibrator(fmt, PerTensor(), start=0.25, stop=4.0, step=0.01)
    for x in _batches(3):
        cal.collect(x)
    loss = mse_loss(cal)
    assert len(cal.multipliers) > MAX_CANDIDATES
    assert len(loss["amax"]) <= MAX_CANDIDATES
    assert loss["amax"] == sorted(loss["amax"])
    assert loss["amax"][loss["best"]] == pytest.approx(float(cal.compute_amax()), rel=1e-6)
    assert loss["mse"][loss["best"]] == min(loss["mse"])


def test_mse_loss_none_for_methods_without_candidates():
    cal = MaxCalibrator(get_format("int8"), PerTensor())
    cal.collect(torch.ones(4))
    assert mse_loss(cal) is None


def test_detail_histogram_only_where_no_calibrator_keeps_one():
    fmt = get_format("int8")
    cals = {
        "a": MaxCalibrator(fmt, PerTensor()),
        "b#max": MaxCalibrator(fmt, PerTensor()),
        "b#percentile": PercentileCalibrator(fmt, PerTensor()),
    }
    specs = {
        "a": ("a", TensorSpec(format="int8", method="max")),
        "b#max": ("b", TensorSpec(format="int8", method="max")),
        "b#percentile": ("b", TensorSpec(format="int8", method="percentile")),
    }
    extra = detail_calibrators(cals, specs, "skip")
    assert list(extra) == ["a"]

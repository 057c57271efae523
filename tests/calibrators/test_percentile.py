"""PercentileCalibrator against a float64 oracle of the same definition (plain loops over the
oracle's own histogram), percentile 100 against the max calibrator, options, and the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from histogram_oracle import collect_all, groups_of, histogram, make_batches, percentile_range
from mlp import batches as mlp_batches
from mlp import make_mlp

from qcal_export.calibrators import CALIBRATORS, MaxCalibrator, PercentileCalibrator
from qcal_export.errors import CalibrationError
from qcal_export.pipeline.calibrate import calibrate_onnx
from qcal_export.spec.formats import AMAX_FLOOR, FP8_E4M3, INT8, UINT8
from qcal_export.spec.granularity import PerAxis, PerTensor
from qcal_export.spec.recipe import Recipe, TensorSpec

FORMATS = {"int8": INT8, "fp8": FP8_E4M3, "uint8": UINT8}
GRANULARITIES = {"per-tensor": PerTensor(), "last-axis": PerAxis(-1)}


def expected_range(data, fmt, granularity, percentile, bins):
    counts, width, amin, amax = histogram(groups_of(data, granularity), bins)
    ranges = [
        percentile_range(counts[g], width[g], amin[g], amax[g], percentile, fmt.symmetric)
        for g in range(len(counts))
    ]
    lo, hi = (np.array(r, dtype=np.float64).astype(np.float32) for r in zip(*ranges, strict=True))
    return lo, hi


def assert_range(cal, lo, hi):
    amin, amax = cal.compute_range()
    assert amin.dtype == amax.dtype == torch.float32
    assert np.array_equal(amin.numpy().reshape(-1), lo)
    assert np.array_equal(amax.numpy().reshape(-1), hi)


@pytest.mark.parametrize("percentile", [99.999, 99.9, 90.0, 50.0])
@pytest.mark.parametrize("kind", ["normal", "student-t", "outliers", "spiky"])
@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_range_equals_the_float64_oracle(fmt_name, gran_name, kind, percentile):
    fmt, granularity = FORMATS[fmt_name], GRANULARITIES[gran_name]
    data = make_batches(kind, seed=11, positive=fmt_name == "uint8")
    cal = collect_all(PercentileCalibrator(fmt, granularity, percentile=percentile, bins=128), data)
    lo, hi = expected_range(data, fmt, granularity, percentile, 128)
    assert_range(cal, lo, hi)
    amax = cal.compute_amax().numpy().reshape(-1)
    bound = np.maximum(np.abs(lo), np.abs(hi))
    assert np.array_equal(amax, np.where(bound == 0, AMAX_FLOOR, bound).astype(np.float32))


@pytest.mark.parametrize("fmt_name", ["int8", "uint8"])
def test_default_options_on_a_large_heavy_tailed_tensor(fmt_name):
    fmt = FORMATS[fmt_name]
    rng = np.random.default_rng(12)
    data = [rng.standard_t(2.0, size=(4, 25_000)).astype(np.float32) for _ in range(2)]
    cal = collect_all(PercentileCalibrator(fmt, PerTensor()), data)
    assert cal.percentile == 99.999 and cal.bins == 2048
    assert_range(cal, *expected_range(data, fmt, PerTensor(), 99.999, 2048))
    assert cal.compute_amax() < np.abs(np.concatenate(data)).max()


@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_percentile_100_is_the_max_calibrator(fmt_name, gran_name):
    fmt, granularity = FORMATS[fmt_name], GRANULARITIES[gran_name]
    data = make_batches("outliers", seed=13)
    cal = collect_all(PercentileCalibrator(fmt, granularity, percentile=100), data)
    reference = collect_all(MaxCalibrator(fmt, granularity), data)
    for got, expected in zip(cal.compute_range(), reference.compute_range(), strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("fmt_name", ["int8", "uint8"])
def test_nan_and_inf_are_skipped(fmt_name):
    fmt = FORMATS[fmt_name]
    data = make_batches("student-t", seed=14)
    for d in data:
        d[0, :3, 0] = [np.nan, np.inf, -np.inf]
    cal = collect_all(PercentileCalibrator(fmt, PerAxis(-1), percentile=99.0, bins=64), data)
    assert cal.nonfinite_count == 12
    assert_range(cal, *expected_range(data, fmt, PerAxis(-1), 99.0, 64))


@pytest.mark.parametrize("fmt", [INT8, UINT8], ids=["int8", "uint8"])
def test_zero_tensor_gives_a_floored_positive_amax(fmt):
    cal = PercentileCalibrator(fmt, PerAxis(0))
    cal.collect(torch.zeros(3, 5))
    amin, amax = cal.compute_range()
    assert torch.equal(amin, torch.zeros(3)) and torch.equal(amax, torch.zeros(3))
    assert ((cal.compute_amax() > 0) & (cal.compute_amax() <= AMAX_FLOOR)).all()


@pytest.mark.parametrize("percentile", [0, -1, 100.5, float("nan"), True, "99"])
def test_bad_percentile_is_rejected(percentile):
    with pytest.raises(CalibrationError, match="percentile"):
        PercentileCalibrator(INT8, PerTensor(), percentile=percentile)


def test_registered_for_recipes():
    assert CALIBRATORS["percentile"] is PercentileCalibrator


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return make_mlp(tmp_path_factory.mktemp("mlp"), seq=True)


def test_calibrate_onnx_with_percentile(mlp):
    """The model input x is the first MatMul's activation: its scale is the calibrator's."""
    result = calibrate_onnx(mlp / "mlp.onnx", mlp / "data", method="percentile", validate_batches=0)
    expected = collect_all(PercentileCalibrator(INT8, PerTensor()), mlp_batches(mlp))
    scales = result.scales["x"]
    assert scales.method == "percentile" and scales.kind == "activation"
    assert torch.equal(scales.amax, expected.compute_amax())
    assert all(s.method == "percentile" for s in result.scales.values() if s.kind == "activation")


def test_recipe_options_reach_the_calibrator(mlp):
    spec = TensorSpec(format="uint8", method="percentile", options={"percentile": 99.0, "bins": 64})
    result = calibrate_onnx(
        mlp / "mlp.onnx", mlp / "data", recipe=Recipe(activation=spec), validate_batches=0
    )
    expected = collect_all(
        PercentileCalibrator(UINT8, PerTensor(), percentile=99.0, bins=64), mlp_batches(mlp)
    )
    amin, amax = expected.compute_range()
    assert torch.equal(result.scales["x"].min, amin) and torch.equal(result.scales["x"].max, amax)

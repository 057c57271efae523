"""Method options: every option a method declares is checked with its range when a
TensorSpec is built; the limits admitted are the ones the calibrators build with, and the first
value past each limit is refused with the option, its value and the range named."""

from __future__ import annotations

import inspect
import math

import pytest

from qcal_export.calibrators import (
    EntropyCalibrator,
    GptqCalibrator,
    HistogramMseCalibrator,
    MseCalibrator,
    ShrinkMseCalibrator,
    entropy,
)
from qcal_export.calibrators.mse import mse_multipliers
from qcal_export.calibrators.percentile import PercentileCalibrator
from qcal_export.calibrators.shrink_mse import shrink_factors
from qcal_export.errors import RecipeError
from qcal_export.spec.formats import INT8
from qcal_export.spec.granularity import PerTensor
from qcal_export.spec.method_options import ENTROPY_MAX_BINS, MAX_BINS, MAX_CANDIDATES
from qcal_export.spec.methods import METHOD_OPTIONS, METHODS, check_method_options
from qcal_export.spec.recipe import TensorSpec

CALIBRATORS = {
    "mse": MseCalibrator,
    "hist-mse": HistogramMseCalibrator,
    "shrink-mse": ShrinkMseCalibrator,
    "percentile": PercentileCalibrator,
    "entropy": EntropyCalibrator,
    "gptq": GptqCalibrator,
}


def test_defaults_and_limits_are_the_calibrators():
    for method in (m for m in METHODS.values() if m.defaults):
        parameters = inspect.signature(CALIBRATORS[method.name].__init__).parameters
        for key, value in method.defaults.items():
            assert parameters[key].default == value, (method.name, key)
    assert ENTROPY_MAX_BINS == entropy.MAX_BINS


def test_every_option_is_a_constructor_argument_of_its_calibrator():
    for method in (m for m in METHODS.values() if m.bounds):
        if method.hessian:  # hessian chooses the data the calibrator gets, not a number
            assert set(method.bounds) == {"hessian"} and method.name == "nvfp4-mse"
            continue
        if method.step_options:  # a step before calibration reads them (AWQ's search)
            assert set(method.bounds) == method.step_options and method.name == "awq"
            assert method.calibrator_options({"clip": 1, "grid": 5}) == {}
            continue
        parameters = inspect.signature(CALIBRATORS[method.name].__init__).parameters
        assert set(method.bounds) <= set(parameters), method.name
    assert METHOD_OPTIONS["auto"] == {
        "start",
        "stop",
        "step",
        "percentile",
        "bins",
        "quantized_bins",
        "max_clipped",
    }


def test_the_largest_candidate_counts_admitted_build_exactly_max_candidates():
    """1 + (1000 - 1) / 1 = 1000 mse multipliers and int(1 * 1000) shrink factors are the limit;
    half a step more (1001 multipliers) or one grid point more is refused."""
    check_method_options("mse", {"start": 1, "stop": 1000, "step": 1})
    assert len(mse_multipliers(1, 1000, 1)) == MAX_CANDIDATES == 1000
    with pytest.raises(RecipeError, match=r"step=1 give more than 1000 candidates"):
        check_method_options("mse", {"start": 0.5, "stop": 1000, "step": 1})
    check_method_options("shrink-mse", {"maxshrink": 1, "grid": 1000})
    assert len(shrink_factors(1, 1000)) == MAX_CANDIDATES
    with pytest.raises(RecipeError, match=r"maxshrink=1, grid=1001 give"):
        check_method_options("shrink-mse", {"maxshrink": 1, "grid": 1001})


def test_the_largest_histograms_admitted_build():
    check_method_options("percentile", {"bins": MAX_BINS})
    assert PercentileCalibrator(INT8, PerTensor(), bins=MAX_BINS).bins == 2**16
    check_method_options("entropy", {"bins": 4999, "quantized_bins": 9998})
    assert EntropyCalibrator(INT8, PerTensor(), bins=4999, quantized_bins=9998).quantized_bins
    with pytest.raises(RecipeError, match=r"quantized_bins=9999 is out of range"):
        check_method_options("entropy", {"bins": 4999, "quantized_bins": 9999})


def test_quantized_bins_are_checked_against_the_default_bins():
    check_method_options("entropy", {"quantized_bins": 4096})
    with pytest.raises(RecipeError, match=r"2 \* bins = 4096 bins"):
        check_method_options("entropy", {"quantized_bins": 4097})


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("mse", {"start": math.nan}, r"'mse' option start=nan .* a finite number in \(0, 1000\]$"),
        ("mse", {"stop": math.inf}, r"option stop=inf is out of range"),
        ("mse", {"step": 0}, r"option step=0 is out of range"),
        ("mse", {"step": -0.1}, r"option step=-0\.1 is out of range"),
        ("mse", {"start": 2.0, "stop": 1.0}, r"mse options need start <= stop"),
        ("mse", {"step": 5e-324}, r"give more than 1000 candidates"),
        ("mse", {"step": True}, r"option step=True is out of range"),
        ("mse", {"start": "0.5"}, r"option start='0\.5' is out of range"),
        ("nvfp4-mse", {"hessian": 2}, r"option hessian=2 .* true or false$"),
        ("nvfp4-mse", {"hessian": "yes"}, r"option hessian='yes'"),
        ("shrink-mse", {"maxshrink": 1.5}, r"maxshrink=1\.5 .* a finite number in \(0, 1\]$"),
        ("shrink-mse", {"grid": math.inf}, r"grid=inf .* a finite number > 0$"),
        ("shrink-mse", {"grid": 1e12}, r"grid=1000000000000\.0 give"),
        ("shrink-mse", {"maxshrink": 0.001}, r"maxshrink=0\.001, grid=100 give"),
        ("shrink-mse", {"norm": 17}, r"norm=17 .* a finite number in \(0, 16\]$"),
        ("shrink-mse", {"patience": 0.5}, r"patience=0\.5 .* an integer >= 1$"),
        ("shrink-mse", {"averaging_constant": 0}, r"averaging_constant=0 .* \(0, 1\]$"),
        ("percentile", {"percentile": 101}, r"percentile=101 .* a finite number in \(0, 100\]$"),
        ("percentile", {"percentile": 0}, r"percentile=0 is out of range"),
        ("percentile", {"bins": 1e10}, r"bins=10000000000\.0 .* an integer in \[2, 65536\]$"),
        ("percentile", {"bins": 64.5}, r"bins=64\.5 is out of range"),
        ("entropy", {"bins": 5000}, r"'entropy' option bins=5000 .* in \[2, 4999\]$"),
        ("entropy", {"quantized_bins": 1}, r"quantized_bins=1 .* in \[2, 9998\]$"),
        ("auto", {"bins": 8192}, r"'entropy' option bins=8192 is out of range"),
        ("auto", {"percentile": -1}, r"'percentile' option percentile=-1 is out of range"),
        ("max", {"bins": 10}, r"method 'max' takes no option\(s\) \['bins'\]; it takes none$"),
        ("mse", [("start", 1)], r"options must be a mapping of option: number"),
    ],
)
def test_bad_option_values_name_the_option_its_value_and_the_range(method, options, message):
    with pytest.raises(RecipeError, match=message):
        check_method_options(method, options)
    with pytest.raises(RecipeError, match=message):  # the recipe checks them when it is built
        TensorSpec("nvfp4" if method == "nvfp4-mse" else "int8", method, options=options)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("mse", {"start": 0.5, "stop": 1.5, "step": 0.25}),
        ("nvfp4-mse", {"hessian": True}),
        ("nvfp4-mse", {"hessian": 0}),
        ("shrink-mse", {"maxshrink": 0.3, "grid": 50, "norm": 2, "patience": 3.0}),
        ("percentile", {"percentile": 99.99, "bins": 4096.0}),
        ("entropy", {"bins": 512, "quantized_bins": 255}),
        ("auto", {"percentile": 99.9, "bins": 1024, "step": 0.05}),
    ],
)
def test_options_in_range_pass(method, options):
    check_method_options(method, options)

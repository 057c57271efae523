"""ShrinkMseCalibrator's edges and plumbing: padding, non-finite and empty input, merges,
options, and the pipeline giving the calibrator's own scales."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from mlp import batches as mlp_batches
from mlp import make_mlp
from onnx import numpy_helper
from shrink_cases import assert_equals_oracle, case_of, quant_for, run
from shrink_oracle import (
    F32,
    make_batches,
    oracle,
)

from qcal_export.calibrators import CALIBRATORS
from qcal_export.calibrators.shrink_mse import ShrinkMseCalibrator, shrink_factors
from qcal_export.errors import CalibrationError
from qcal_export.pipeline.calibrate import calibrate_onnx
from qcal_export.spec.formats import INT8, NVFP4, UINT4, UINT8, get_format
from qcal_export.spec.granularity import (
    PerAxis,
    PerBlock,
    PerTensor,
    PerTensorGroup,
    PerToken,
)


def test_padding_zeros_dequantize_to_zero_in_asymmetric_formats():
    """Partial blocks are padded with 0; with the range extended to include 0 and an integer
    zero point, 0 comes back as exactly 0, so the padding adds no error."""
    rng = np.random.default_rng(0)
    amin = torch.from_numpy(-np.abs(rng.standard_t(2, 2000)).astype(F32) * rng.choice([0, 1], 2000))
    amax = torch.from_numpy(
        np.abs(rng.standard_t(2, 2000)).astype(F32) * 10.0 ** rng.integers(-8, 8, 2000)
    )
    for fmt in (UINT8, UINT4):
        scale, zero_point = fmt.scale_zero_point(amin, amax)
        assert torch.equal(fmt.fake_quant(torch.zeros(2000), scale, zero_point), torch.zeros(2000))


def test_nonfinite_values_are_counted_and_left_out():
    fmt, gran, shape, group = case_of("block-uint8")
    data = make_batches(shape, fmt, seed=13)
    data[0][0, 0, :3] = [np.nan, np.inf, -np.inf]
    data[2][1, 19, 39] = np.nan
    cal = run(ShrinkMseCalibrator(fmt, gran), data)
    assert cal.nonfinite_count == 4
    missing = [np.where(np.isfinite(x), x, np.nan).astype(F32) for x in data]
    running, _, _ = oracle([(group(x), x) for x in missing], quant_for(fmt))
    assert_equals_oracle(cal, fmt, gran, shape, running)
    strict = ShrinkMseCalibrator(fmt, gran, nonfinite="error")
    with pytest.raises(CalibrationError, match="non-finite"):
        strict.collect(torch.from_numpy(data[0]))


def test_empty_tensors_are_a_no_op():
    cal = ShrinkMseCalibrator(INT8, PerToken())
    cal.collect(torch.empty(0, 4))
    assert cal.compute_amax() is None and cal.compute_range() is None
    assert cal.compute_global_amax() is None and cal.state_dict() == {}
    x = make_batches((3, 4), INT8, seed=1, count=1)[0]
    cal.collect(torch.from_numpy(x))
    state = cal.state_dict()
    cal.collect(torch.empty(0, 4))
    assert all(torch.equal(v, state[k]) for k, v in cal.state_dict().items())


def test_merge_is_the_batch_weighted_mean_of_running_values():
    fmt, gran, shape, _ = case_of("channel-int8")
    data = make_batches(shape, fmt, seed=17)
    first, second = (
        run(ShrinkMseCalibrator(fmt, gran), data[:2]),
        run(ShrinkMseCalibrator(fmt, gran), data[2:]),
    )
    assert set(first.state_dict()) == set(ShrinkMseCalibrator.merge_ops)
    ran_first, _, _ = oracle([(x, x) for x in data[:2]], quant_for(fmt))
    ran_second, _, _ = oracle([(x, x) for x in data[2:]], quant_for(fmt))
    first.merge_(second.state_dict())
    mean = [(2 * a + b) / 3 for a, b in zip(ran_first, ran_second, strict=True)]
    assert_equals_oracle(first, fmt, gran, shape, mean)
    assert (
        first.state_dict()["batches"].item() == 3
        and first.state_dict()["numel"].item() == 3 * 24 * 40
    )
    empty = ShrinkMseCalibrator(fmt, gran)
    empty.merge_(first.state_dict())  # into an empty calibrator: the same state
    assert all(
        torch.equal(a, b) for a, b in zip(empty.compute_range(), first.compute_range(), strict=True)
    )


def test_merge_keeps_the_larger_abs_max_of_the_block_form():
    small, large = make_batches((4, 32), NVFP4, seed=2, count=2)
    a = run(ShrinkMseCalibrator(NVFP4, PerBlock(-1, 16)), [small])
    b = run(ShrinkMseCalibrator(NVFP4, PerBlock(-1, 16)), [large * 3])
    a.merge_(b.state_dict())
    assert a.compute_global_amax().item() == np.abs(large * 3).max()


def test_failed_merge_leaves_the_state_alone():
    a = run(ShrinkMseCalibrator(INT8, PerAxis(0)), make_batches((4, 8), INT8, seed=3, count=2))
    b = run(ShrinkMseCalibrator(INT8, PerAxis(0)), make_batches((5, 8), INT8, seed=3, count=1))
    before = a.state_dict()
    with pytest.raises(CalibrationError, match="cannot merge"):
        a.merge_(b.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in a.state_dict().items())
    a.merge_({})
    assert all(torch.equal(v, before[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("maxshrink", 0),
        ("maxshrink", 1.5),
        ("maxshrink", float("nan")),
        ("maxshrink", "0.2"),
        ("grid", 0),
        ("grid", float("inf")),
        ("grid", True),
        ("norm", 0),
        ("norm", -2.0),
        ("patience", 0),
        ("patience", 2.5),
        ("patience", float("inf")),
        ("averaging_constant", 0.0),
        ("averaging_constant", 1.01),
    ],
)
def test_bad_options_raise_naming_the_option(option, value):
    with pytest.raises(CalibrationError, match=f"option {option} must be"):
        ShrinkMseCalibrator(INT8, PerTensor(), **{option: value})


def test_candidates_are_the_observer_grid():
    assert torch.equal(shrink_factors(), 1 - torch.arange(20, dtype=torch.float64) / 100)
    assert len(shrink_factors(1.0, 7)) == 7 and len(shrink_factors(0.29, 100)) == 28
    with pytest.raises(CalibrationError, match="no candidate"):
        shrink_factors(0.001, 100)
    assert CALIBRATORS["shrink-mse"] is ShrinkMseCalibrator


@pytest.mark.parametrize("gran", [PerAxis(0), PerBlock(-1, 32), PerTensorGroup(-1, 8), PerToken()])
def test_nvfp4_needs_blocks_of_16(gran):
    with pytest.raises(CalibrationError, match=r"PerBlock\(axis, 16\).*PerTensorGroup"):
        ShrinkMseCalibrator(NVFP4, gran)


@pytest.mark.parametrize(
    ("fmt", "activations"), [("int8", PerTensor()), ("nvfp4", PerTensorGroup(-1, 16))]
)
def test_calibrate_onnx_gives_the_calibrators_scales(tmp_path, fmt, activations):
    """The MLP's input and weights: the pipeline's scales are those of a calibrator run by hand
    on the same tensors, with the method options passed through."""
    root = make_mlp(tmp_path, seq=False)
    result = calibrate_onnx(
        root / "mlp.onnx",
        root / "data",
        format=fmt,
        method="shrink-mse",
        weight_method="shrink-mse",
        method_options={"maxshrink": 0.3, "patience": 3},
        validate_batches=0,
    )
    assert all(
        torch.isfinite(s.scale).all() and (s.scale > 0).all() for s in result.scales.values()
    )
    options = dict(maxshrink=0.3, patience=3)
    cal = run(ShrinkMseCalibrator(get_format(fmt), activations, **options), mlp_batches(root))
    assert torch.equal(result.scales["x"].amax, cal.compute_amax())
    initializers = {t.name: t for t in onnx.load(str(root / "mlp.onnx")).graph.initializer}
    for name in ("up.weight", "head.weight"):
        s = result.scales[name]
        weight = numpy_helper.to_array(initializers[name]).copy()
        cal = run(ShrinkMseCalibrator(get_format(fmt), s.granularity, **options), [weight])
        assert torch.equal(s.amax, cal.compute_amax())
        if fmt == "nvfp4":
            assert s.global_scale == NVFP4.global_scale(np.abs(weight).max())

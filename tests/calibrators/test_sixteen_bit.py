"""Every calibrator on the 16-bit grids (int16: ``amax / 32767``; uint16: ``(max - min) / 65535``
and a zero point) against float64 brute forces, on data where the 8-bit grid chooses another
range, so that a search scored on the 8-bit grid fails here."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from histogram_oracle import (
    collect_all,
    entropy_range,
    groups_of,
    histogram,
    percentile_range,
)
from histogram_oracle import make_batches as histogram_batches
from oracle import (
    CHANNELS,
    GRANULARITIES,
    INT_LEVELS,
    assert_matches_oracle,
    grouped,
    initial_range,
    layout,
    make_batches,
    oracle,
)
from shrink_cases import STRATEGIES, assert_equals_oracle, quant_for, run
from shrink_oracle import make_batches as shrink_batches
from shrink_oracle import oracle as shrink_oracle

from qcal_export.calibrators import mse
from qcal_export.calibrators.entropy import EntropyCalibrator
from qcal_export.calibrators.max import MaxCalibrator
from qcal_export.calibrators.mse import MseCalibrator
from qcal_export.calibrators.percentile import PercentileCalibrator
from qcal_export.calibrators.shrink_mse import ShrinkMseCalibrator
from qcal_export.spec.formats import INT8, INT16, UINT8, UINT16
from qcal_export.spec.granularity import PerAxis, PerTensor

F32 = np.float32
SIXTEEN = {"int16": INT16, "uint16": UINT16}
EIGHT = {"int16": INT8, "uint16": UINT8}
"""The 8-bit format of the same signedness and symmetry."""


def clipped_batches(fmt, gran_name: str, seed: int) -> list[np.ndarray]:
    """Three batches ``[b, 7, C]`` (``[C, b, 7]`` for axis 0) of thousands of normal values per
    channel and a few 12-sigma outliers: the 8-bit MSE search clips them, the 16-bit one not."""
    rng = np.random.default_rng(seed)
    gains = np.geomspace(0.05, 20.0, CHANNELS)
    out = []
    for b in (900, 1500, 600):
        x = rng.normal(size=(b, 7, CHANNELS))
        x[rng.random(x.shape) < 2e-4] *= 12.0
        x = x * gains + (0.0 if fmt.symmetric else 0.8 * gains)
        out.append(x.astype(F32))
    return layout(out, gran_name)


def expected_qparams(name: str, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float32 scale and zero point of float64 ranges ``[G]``, by the definition: symmetric
    ``amax / qmax``; asymmetric the range with 0 over ``qmax - qmin``, ``round(qmin - min /
    scale)`` (IEEE float32 arithmetic in numpy; a float64 quotient of float32 operands rounds
    to the float32 quotient)."""
    qmin, qmax = INT_LEVELS[name]
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    if qmin < 0:
        bound = np.maximum(-lo, hi).astype(F32).astype(np.float64)
        return (bound / qmax).astype(F32), np.zeros(len(lo), F32)
    width = (hi.astype(F32).astype(np.float64) - lo.astype(F32)).astype(F32)
    scale = (width.astype(np.float64) / (qmax - qmin)).astype(F32)
    zero_point = np.clip(np.rint(F32(qmin) - lo.astype(F32) / scale), qmin, qmax).astype(F32)
    return scale, zero_point


def assert_qparams(cal, name: str, lo: np.ndarray, hi: np.ndarray) -> None:
    """The calibrator's range gives the float64 definition's scale and zero point."""
    fmt = SIXTEEN[name]
    scale, zero_point = fmt.scale_zero_point(*cal.compute_range())
    want_scale, want_zero_point = expected_qparams(name, lo, hi)
    assert np.array_equal(scale.numpy().reshape(-1), want_scale)
    assert np.array_equal(zero_point.numpy().reshape(-1), want_zero_point)


@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
@pytest.mark.parametrize("name", list(SIXTEEN))
def test_max_scale_is_the_range_over_the_16_bit_levels(name, gran_name):
    fmt, granularity = SIXTEEN[name], GRANULARITIES[gran_name]
    data = make_batches("outliers", fmt, gran_name, seed=zlib.crc32(name.encode()))
    cal = MaxCalibrator(fmt, granularity)
    for d in data:
        cal.collect(torch.from_numpy(d))
    values = grouped(data, granularity).astype(np.float64)
    lo, hi = values.min(axis=1), values.max(axis=1)
    assert_qparams(cal, name, lo, hi)
    if fmt.symmetric:
        scale, _ = fmt.scale_zero_point(*cal.compute_range())
        amax = np.maximum(-lo, hi)
        assert np.allclose(scale.numpy().reshape(-1) * 32767, amax, rtol=1e-7, atol=0)


@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
@pytest.mark.parametrize("name", list(SIXTEEN))
def test_mse_chooses_the_least_squared_error_on_the_16_bit_grid(name, gran_name):
    fmt, granularity = SIXTEEN[name], GRANULARITIES[gran_name]
    data = clipped_batches(fmt, gran_name, seed=zlib.crc32(f"{name}{gran_name}".encode()))
    amin0, amax0 = initial_range(fmt, granularity, data)
    cal = MseCalibrator(fmt, granularity, amin0=amin0, amax0=amax0)
    for d in data:
        cal.collect(torch.from_numpy(d))
    lo, hi, losses = oracle(fmt, granularity, data, amin0, amax0)
    assert_matches_oracle(cal, fmt, granularity, lo, hi)
    np.testing.assert_allclose(cal.state_dict()["losses"].numpy(), losses, rtol=1e-12)
    assert_qparams(cal, name, lo.astype(np.float64), hi.astype(np.float64))
    _, hi8, _ = oracle(EIGHT[name], granularity, data, amin0, amax0)
    assert (hi > hi8).all()  # the 8-bit grid clips the outliers, the 16-bit one keeps them


@pytest.mark.parametrize("name", list(SIXTEEN))
def test_mse_bucket_sweep_equals_the_oracle_on_the_16_bit_grid(name, monkeypatch):
    """The fine-histogram sweep of one large group (bucket_sweep.py), forced on a small one:
    at 16 bits a bucket near the range's end spans several steps and is scored value by value."""
    fmt, granularity = SIXTEEN[name], PerTensor()
    calls = []

    def spy(*args):
        calls.append(len(args[1]))
        return bucket_losses(*args)

    bucket_losses = mse.bucket_losses
    monkeypatch.setattr(mse, "MIN_VALUES", 1)
    monkeypatch.setattr(mse, "bucket_losses", spy)
    rng = np.random.default_rng(31)
    x = rng.standard_t(3.0, 60_000).astype(F32) + (0.0 if fmt.symmetric else F32(2.0))
    amin0, amax0 = initial_range(fmt, granularity, [x])
    cal = MseCalibrator(fmt, granularity, amin0=amin0, amax0=amax0)
    cal.collect(torch.from_numpy(x))
    assert calls == [x.size]
    lo, hi, losses = oracle(fmt, granularity, [x], amin0, amax0)
    assert_matches_oracle(cal, fmt, granularity, lo, hi)
    np.testing.assert_allclose(cal.state_dict()["losses"].numpy(), losses, rtol=1e-9)


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
@pytest.mark.parametrize("name", list(SIXTEEN))
def test_shrink_mse_equals_the_oracle_and_shrinks_less_than_8_bits(name, strategy):
    """At 16 bits the rounding error is far below what clipping 1% costs: the search keeps
    ranges that the 8-bit search shrinks (both per the float64 oracle; groups of thousands,
    where 8-bit ranges shrink)."""
    fmt = SIXTEEN[name]
    granularity, _, group = STRATEGIES[strategy]
    shape = (8, 50, 60) if strategy == "tensor" else (24, 4000)
    data = shrink_batches(shape, fmt, seed=zlib.crc32(f"{name}{strategy}".encode()))
    cal = run(ShrinkMseCalibrator(fmt, granularity), data)
    batches = [(group(x), x) for x in data]
    running, _, shrunk = shrink_oracle(batches, quant_for(fmt))
    assert_equals_oracle(cal, fmt, granularity, shape, running)
    _, _, shrunk8 = shrink_oracle(batches, quant_for(EIGHT[name]))
    assert sum(shrunk) < sum(shrunk8)


@pytest.mark.parametrize("percentile", [99.9, 90.0])
@pytest.mark.parametrize("name", list(SIXTEEN))
def test_percentile_scale_equals_the_float64_oracle(name, percentile):
    fmt, granularity = SIXTEEN[name], PerAxis(-1)
    data = histogram_batches("student-t", seed=41, positive=not fmt.symmetric)
    cal = collect_all(PercentileCalibrator(fmt, granularity, percentile=percentile, bins=128), data)
    counts, width, amin, amax = histogram(groups_of(data, granularity), 128)
    ranges = [
        percentile_range(counts[g], width[g], amin[g], amax[g], percentile, fmt.symmetric)
        for g in range(len(counts))
    ]
    lo, hi = (np.array(r, np.float64).astype(F32) for r in zip(*ranges, strict=True))
    got_lo, got_hi = (t.numpy().reshape(-1) for t in cal.compute_range())
    assert np.array_equal(got_lo, lo) and np.array_equal(got_hi, hi)
    assert_qparams(cal, name, lo.astype(np.float64), hi.astype(np.float64))


@pytest.mark.parametrize("name", list(SIXTEEN))
def test_entropy_models_the_16_bit_grid(name):
    """The default quantized bins are the histogram's own (65536 levels are more than it has):
    one window, the observed range, where the 8-bit default (256) clips the outliers."""
    fmt, granularity, bins = SIXTEEN[name], PerAxis(-1), 512
    data = histogram_batches("outliers", seed=43, positive=not fmt.symmetric)
    cal = collect_all(EntropyCalibrator(fmt, granularity, bins=bins), data)
    assert cal.quantized_bins == 2 * bins
    counts, width, amin, amax = histogram(groups_of(data, granularity), bins)
    ranges = [
        entropy_range(counts[g], width[g], amin[g], amax[g], 2 * bins, fmt.symmetric, 1e-3)
        for g in range(len(counts))
    ]
    lo, hi = (np.array(r, np.float64).astype(F32) for r in zip(*ranges, strict=True))
    got_lo, got_hi = (t.numpy().reshape(-1) for t in cal.compute_range())
    assert np.array_equal(got_lo, lo) and np.array_equal(got_hi, hi)
    assert_qparams(cal, name, lo.astype(np.float64), hi.astype(np.float64))
    maxed = collect_all(MaxCalibrator(fmt, granularity), data)
    assert torch.equal(cal.compute_amax(), maxed.compute_amax())
    eight = collect_all(EntropyCalibrator(EIGHT[name], granularity, bins=bins), data)
    assert eight.quantized_bins == 256
    assert (eight.compute_amax() < cal.compute_amax()).any()


def test_entropy_takes_quantized_bins_given_for_16_bits():
    data = histogram_batches("outliers", seed=44)
    cal = collect_all(EntropyCalibrator(INT16, PerTensor(), bins=256, quantized_bins=64), data)
    eight = collect_all(EntropyCalibrator(INT8, PerTensor(), bins=256, quantized_bins=64), data)
    assert cal.quantized_bins == 64
    assert torch.equal(cal.compute_amax(), eight.compute_amax())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
@pytest.mark.parametrize("name", list(SIXTEEN))
def test_cuda_sweeps_choose_the_16_bit_oracle_ranges(name, gran_name):
    """The Triton mse sweep (QMIN/QMAX of the format) and the torch shrink search on CUDA."""
    fmt, granularity = SIXTEEN[name], GRANULARITIES[gran_name]
    data = clipped_batches(fmt, gran_name, seed=zlib.crc32(f"cuda{name}".encode()))
    amin0, amax0 = initial_range(fmt, granularity, data)
    cal = MseCalibrator(fmt, granularity, amin0=amin0.cuda(), amax0=amax0.cuda())
    for d in data:
        cal.collect(torch.from_numpy(d).cuda())
    lo, hi, losses = oracle(fmt, granularity, data, amin0, amax0)
    assert_matches_oracle(cal, fmt, granularity, lo, hi)
    np.testing.assert_allclose(cal.state_dict()["losses"].cpu().numpy(), losses, rtol=5e-6)
    granularity, _, group = STRATEGIES["channel"]
    batches = shrink_batches((24, 4000), fmt, seed=51)
    on_gpu = ShrinkMseCalibrator(fmt, granularity)
    for x in batches:
        on_gpu.collect(torch.from_numpy(x).cuda())
    running, _, _ = shrink_oracle([(group(x), x) for x in batches], quant_for(fmt))
    assert_equals_oracle(on_gpu, fmt, granularity, (24, 4000), running)

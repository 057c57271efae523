"""HistogramMseCalibrator: on data that lies exactly on its scoring points its losses are the
float64 brute force's; elsewhere it picks what the exact mse sweep picks, to within the
multiplier grid; merged states equal one; block formats are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcal_export.calibrators import (
    CALIBRATORS,
    HistogramMseCalibrator,
    MaxCalibrator,
    MseCalibrator,
)
from qcal_export.calibrators.hist_mse import SUBPOINTS
from qcal_export.errors import CalibrationError
from qcal_export.spec.formats import FP8_E4M3, INT8, UINT8, get_format
from qcal_export.spec.granularity import PerAxis, PerTensor

FORMATS = {"int8": INT8, "fp8": FP8_E4M3, "uint8": UINT8}


def on_points(bins: int, seed: int, positive: bool) -> torch.Tensor:
    """Values on the calibrator's scoring points (each occupied bin at all of its points, with
    one count per point), for a histogram whose bin width is 1/64: the largest magnitude is
    just under ``bins / 64``."""
    rng = np.random.default_rng(seed)
    width = 1.0 / 64
    low = 0 if positive else -bins
    occupied = rng.choice(np.arange(low, bins), size=bins // 3, replace=False)
    occupied = np.append(occupied, bins - 1)
    repeats = rng.integers(1, 5, size=occupied.size)
    offsets = (np.arange(SUBPOINTS) + 0.5) / SUBPOINTS
    points = (occupied[:, None] + offsets[None]) * width
    return torch.tensor(np.repeat(points, repeats, axis=0).ravel(), dtype=torch.float32)


def brute_losses(x: torch.Tensor, fmt, amin: torch.Tensor, amax: torch.Tensor) -> np.ndarray:
    """Per candidate, the summed squared Q -> DQ error of every value, in float64."""
    out = []
    for lo, hi in zip(amin[:, 0], amax[:, 0], strict=True):
        scale, zero_point = fmt.scale_zero_point(lo, hi)
        xq = fmt.fake_quant(x, scale, zero_point)
        out.append(float(((xq.double() - x.double()) ** 2).sum()))
    return np.array(out)


@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_losses_equal_the_brute_force_on_the_scoring_points(fmt_name):
    fmt = FORMATS[fmt_name]
    x = on_points(bins=256, seed=3, positive=fmt_name == "uint8")
    cal = HistogramMseCalibrator(fmt, PerTensor(), bins=256)
    cal.collect(x)
    assert float(cal.histogram()[1][0]) == 1.0 / 64
    amin, amax = cal.candidates()
    expected = brute_losses(x, fmt, amin, amax)
    np.testing.assert_allclose(cal.losses()[0].numpy(), expected, rtol=1e-9)
    best = int(np.argmin(expected))
    lo, hi = cal.compute_range()
    assert (float(lo), float(hi)) == (float(amin[best, 0]), float(amax[best, 0]))


@pytest.mark.parametrize("kind", ["normal", "laplace", "heavy"])
@pytest.mark.parametrize("fmt_name", ["int8", "fp8"])
def test_picks_the_exact_sweeps_amax_within_one_multiplier(fmt_name, kind):
    fmt = FORMATS[fmt_name]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(100_000, generator=gen)
    if kind == "laplace":
        x = torch.sign(x) * torch.empty_like(x).exponential_(generator=gen)
    elif kind == "heavy":
        x = x.relu() ** 3
    hist = HistogramMseCalibrator(fmt, PerTensor())
    hist.collect(x)
    exact = MseCalibrator(fmt, PerTensor(), amax0=x.abs().max())
    exact.collect(x)
    amax0 = float(x.abs().max())
    got, want = float(hist.compute_amax()) / amax0, float(exact.compute_amax()) / amax0
    assert abs(got - want) <= 0.1 + 1e-6


@pytest.mark.parametrize("fmt_name", ["int16", "uint16"])
def test_a_grid_finer_than_the_bins_scores_as_the_exact_sweep(fmt_name):
    """16-bit steps are finer than a bin's scoring points: the losses (uniform rounding inside
    the range, clipping outside) stay near the exact per-value sweep's (values in the spike at
    zero round with less than the uniform error) and the pick within one multiplier."""
    fmt = get_format(fmt_name)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(200_000, generator=gen) ** 3
    if fmt_name == "uint16":
        x = x.abs()
    hist = HistogramMseCalibrator(fmt, PerTensor())
    hist.collect(x)
    first = MaxCalibrator(fmt, PerTensor())
    first.collect(x)
    exact = MseCalibrator(fmt, PerTensor())
    exact.set_initial_range(*first.compute_range())
    exact.collect(x)
    np.testing.assert_allclose(
        hist.losses()[0].numpy(), exact.state_dict()["losses"][0].numpy(), rtol=0.25
    )
    amax0 = float(x.abs().max())
    got, want = float(hist.compute_amax()) / amax0, float(exact.compute_amax()) / amax0
    assert abs(got - want) <= 0.1 + 1e-6


def test_per_channel_and_merged_states_equal_one_calibrator():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, 8, generator=gen) * torch.linspace(0.1, 10, 8)
    whole = HistogramMseCalibrator(INT8, PerAxis(-1))
    whole.collect(x)
    parts = [HistogramMseCalibrator(INT8, PerAxis(-1)) for _ in range(2)]
    parts[0].collect(x[:32])
    parts[1].collect(x[32:] * 1.0)
    parts[0].merge_(parts[1].state_dict())
    assert torch.equal(parts[0].compute_amax(), whole.compute_amax())
    for channel in range(8):
        alone = HistogramMseCalibrator(INT8, PerTensor())
        alone.collect(x[:, channel])
        assert torch.equal(alone.compute_amax().reshape(()), whole.compute_amax()[channel])


def test_block_formats_are_refused_and_the_method_is_registered():
    assert CALIBRATORS["hist-mse"] is HistogramMseCalibrator
    with pytest.raises(CalibrationError, match="hist-mse chooses one scale per group"):
        HistogramMseCalibrator(get_format("nvfp4"), PerTensor())


def test_losses_are_scored_again_whenever_the_state_changes():
    """The losses the decision scored are the ones a report reads, until a collect, merge or
    restore changes the histogram: then they are those of a calibrator built on the new state."""
    gen = torch.Generator().manual_seed(3)
    first, second = (torch.randn(4096, generator=gen) * s for s in (1.0, 3.0))
    cal = HistogramMseCalibrator(INT8, PerTensor())
    cal.collect(first)
    cal.compute_range()
    assert cal.losses() is cal.losses()
    alone = HistogramMseCalibrator(INT8, PerTensor())
    alone.collect(first)
    torch.testing.assert_close(cal.losses(), alone.losses(), rtol=0, atol=0)
    for change in ("collect", "merge", "restore"):
        other = HistogramMseCalibrator(INT8, PerTensor())
        other.collect(second)
        fresh = HistogramMseCalibrator(INT8, PerTensor())
        fresh.restore(cal.snapshot())
        if change == "collect":
            cal.collect(second)
            fresh.collect(second)
        elif change == "merge":
            cal.merge_(other.state_dict())
            fresh.merge_(other.state_dict())
        else:
            cal.restore(other.snapshot())
            fresh = other
        torch.testing.assert_close(cal.losses(), fresh.losses(), rtol=0, atol=0)

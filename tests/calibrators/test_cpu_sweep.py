"""The CPU sweeps' shortcuts (calibrators/cpu_sweep.py): tiles, and the values every candidate
quantizes to 0 set apart, checked by fake-quantizing them under each candidate and against the
float64 MSE oracle (oracle.py) on tensors with outliers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import F32, oracle

from qcal_export.calibrators import bucket_sweep, cpu_sweep, mse
from qcal_export.calibrators.mse import MseCalibrator, mse_multipliers
from qcal_export.spec.formats import FP8_E4M3, INT8, UINT8
from qcal_export.spec.granularity import PerAxis, PerTensor

FORMATS = {"int8": INT8, "uint8": UINT8, "fp8": FP8_E4M3}


def outliers(fmt, size: int, seed: int) -> np.ndarray:
    """Normal values, a few far larger; FP8 also gets many tiny ones (its zero is narrow)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=size)
    x[rng.random(size) < 0.003] *= 3000.0
    if fmt is FP8_E4M3:
        x[rng.random(size) < 0.5] *= 1e-7
    if fmt is UINT8:
        x += 0.5
    return x.astype(F32)


def candidate_ranges(fmt, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The mse sweep's candidate (min, max) of ``x``'s range, ``[K, 1]`` float32."""
    m = mse_multipliers().double()[:, None]
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if fmt.symmetric:
        lo = -max(-lo, hi)
        hi = -lo
    return (m * F32(lo)).float(), (m * F32(hi)).float()


@pytest.mark.parametrize(("rows", "cols", "per_tile", "align"), [(7, 13, 20, 1), (3, 64, 40, 16)])
def test_tiles_cover_every_element_once(rows, cols, per_tile, align):
    seen = np.zeros((rows, cols), dtype=int)
    for r, c in cpu_sweep.tiles(rows, cols, per_tile, align):
        seen[r, c] += 1
        width = len(range(cols)[c])
        assert width % align == 0 or c.stop >= cols
        assert len(range(rows)[r]) * width <= max(per_tile, align)
    assert (seen == 1).all()
    assert list(cpu_sweep.tiles(4, 0, 10, 1)) == []


@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_values_set_apart_are_zero_under_every_candidate(fmt_name):
    fmt = FORMATS[fmt_name]
    x = outliers(fmt, 20000, seed=1)
    amin, amax = candidate_ranges(fmt, x)
    scale, zero_point = fmt.scale_zero_point(amin, amax)
    split = cpu_sweep.split_zeros(fmt, torch.from_numpy(x)[None], scale)
    assert split is not None
    rest, zeroed = split
    apart = zeroed.numpy() != 0
    assert np.array_equal(np.sort(np.concatenate([rest[0].numpy(), x[apart]])), np.sort(x[x != 0]))
    assert apart.sum() > 0.25 * x.size and rest.shape[1] > 0
    values = torch.from_numpy(x)
    for k in range(len(scale)):
        xq = fmt.fake_quant(values, scale[k], zero_point[k]).numpy()
        assert (xq[apart] == 0).all()
    smallest = int(scale[:, 0].argmin())
    kept = fmt.fake_quant(rest[0], scale[smallest], zero_point[smallest])
    assert (kept != 0).all()


def test_nothing_is_set_apart_where_few_values_are_zero_or_there_are_many_groups():
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(1, 5000)).astype(F32))
    scale = torch.tensor([[0.01], [0.02]])
    assert cpu_sweep.split_zeros(INT8, x, scale) is None
    assert cpu_sweep.split_zeros(INT8, x.reshape(2, -1), torch.full((2, 2), 100.0)) is None


@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_mse_with_values_set_apart_matches_float64_oracle(fmt_name, monkeypatch):
    """Per tensor, two batches with outliers: the losses of the float64 brute force (1e-12) and
    its choice, the split taken in both batches."""
    fmt = FORMATS[fmt_name]
    data = [outliers(fmt, 30000, seed=3), outliers(fmt, 20000, seed=4)]
    splits = []
    original = cpu_sweep.split_zeros
    monkeypatch.setattr(mse, "split_zeros", lambda *a: splits.append(original(*a)) or splits[-1])
    lo = min(min(float(d.min()) for d in data), 0.0)
    hi = max(float(d.max()) for d in data)
    amin0, amax0 = (-max(-lo, hi), max(-lo, hi)) if fmt.symmetric else (lo, hi)
    cal = MseCalibrator(fmt, PerTensor(), amin0=amin0, amax0=amax0)
    for d in data:
        cal.collect(torch.from_numpy(d))
    assert len(splits) == 2 and all(s is not None for s in splits)
    expected_amin, expected_amax, losses = oracle(fmt, PerTensor(), data, amin0, amax0)
    np.testing.assert_allclose(cal.state_dict()["losses"].numpy(), losses, rtol=1e-12)
    amin, amax = cal.compute_range()
    assert amax.item() == expected_amax[0] and amin.item() == expected_amin[0]


@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_per_channel_tiles_of_whole_rows_match_float64_oracle(fmt_name, monkeypatch):
    """Many channels of many values: tiles of several whole rows and of parts of a row."""
    fmt = FORMATS[fmt_name]
    rng = np.random.default_rng(5)
    x = (rng.standard_t(3.0, size=(40, 300)) * np.geomspace(0.01, 10, 40)[:, None]).astype(F32)
    if fmt is UINT8:
        x += np.abs(x).max(axis=1, keepdims=True) / 3
    lo, hi = np.minimum(x.min(axis=1), 0), np.maximum(x.max(axis=1), 0)
    bound = np.maximum(-lo, hi)
    amin0, amax0 = (-bound, bound) if fmt.symmetric else (lo, hi)
    for tile in (39 * 300 * 3, 39 * 100):
        monkeypatch.setattr(mse, "TILE_ELEMENTS", tile)
        cal = MseCalibrator(
            fmt, PerAxis(0), amin0=torch.from_numpy(amin0), amax0=torch.from_numpy(amax0)
        )
        cal.collect(torch.from_numpy(x))
        expected_amin, expected_amax, losses = oracle(fmt, PerAxis(0), [x], amin0, amax0)
        np.testing.assert_allclose(cal.state_dict()["losses"].numpy(), losses, rtol=1e-12)
        amin, amax = cal.compute_range()
        assert np.array_equal(amax.numpy(), expected_amax)
        assert np.array_equal(amin.numpy(), expected_amin)


def bucket_data(fmt, seed: int) -> np.ndarray:
    """Outliers, many tiny values, exact zeros of both signs, values on the int8 grid of the
    initial range (ties of the rounding), and values at the ends of buckets."""
    x = outliers(fmt, 90000, seed)
    rng = np.random.default_rng(seed)
    x[:50] = 0.0
    x[50:100] = -0.0
    grid = np.abs(x).max() / 127
    x[100:2100] = (rng.integers(-40, 40, 2000) + 0.5) * grid
    ends = np.arange(1, 1001, dtype=np.int64) << bucket_sweep.SHIFT
    x[2100:3100] = (ends + (127 << 23)).astype(np.int32).view(F32)  # near 1.0
    x[3100:4100] = -((ends - 1 + (127 << 23)).astype(np.int32).view(F32))
    return x


@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_bucket_losses_match_float64_oracle(fmt_name, monkeypatch):
    """One large group per tensor: the histogram losses of every candidate agree with the float64
    brute force to 1e-12, and the choice is its choice."""
    fmt = FORMATS[fmt_name]
    data = [bucket_data(fmt, seed=6), bucket_data(fmt, seed=7)]
    used = []
    original = bucket_sweep.bucket_losses
    monkeypatch.setattr(mse, "bucket_losses", lambda *a: used.append(1) or original(*a))
    monkeypatch.setattr(mse, "MIN_VALUES", 1 << 16)  # the data is smaller than the default
    lo = min(min(float(d.min()) for d in data), 0.0)
    hi = max(float(d.max()) for d in data)
    amin0, amax0 = (-max(-lo, hi), max(-lo, hi)) if fmt.symmetric else (lo, hi)
    cal = MseCalibrator(fmt, PerTensor(), amin0=amin0, amax0=amax0)
    for d in data:
        cal.collect(torch.from_numpy(d))
    assert len(used) == 2
    expected_amin, expected_amax, losses = oracle(fmt, PerTensor(), data, amin0, amax0)
    np.testing.assert_allclose(cal.state_dict()["losses"].numpy(), losses, rtol=1e-12)
    amin, amax = cal.compute_range()
    assert amax.item() == expected_amax[0] and amin.item() == expected_amin[0]


@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_bucket_losses_of_a_narrow_range_match_the_value_by_value_sweep(fmt_name):
    """A range far below the values' (most clip) and one far above (most round to 0): the
    histogram losses are the tile sweep's."""
    fmt = FORMATS[fmt_name]
    x = torch.from_numpy(bucket_data(fmt, seed=8))
    for amax0 in (1e-3, 1e6):
        amin0 = -amax0 if fmt.symmetric else -amax0 / 3
        sums = []
        for values in (1 << 16, len(x) + 1):
            cal = MseCalibrator(fmt, PerTensor(), amin0=amin0, amax0=amax0)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(mse, "MIN_VALUES", values)
                cal.collect(x)
            sums.append(cal.state_dict()["losses"])
        torch.testing.assert_close(sums[0], sums[1], rtol=1e-12, atol=0)

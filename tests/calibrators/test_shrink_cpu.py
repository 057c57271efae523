"""shrink-mse's CPU search (calibrators/shrink_cpu.py) against the float64 search: the same
winners on tensors with outliers (values set apart, groups left out by their largest values),
on near and exact ties (decided in float64), and the float32 errors within their bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shrink_cases import assert_equals_oracle, quant_for, run
from shrink_oracle import F32, oracle

from qcal_export.calibrators import shrink_cpu
from qcal_export.calibrators.shrink_mse import ShrinkMseCalibrator
from qcal_export.spec.formats import FP8_E4M3, INT8, UINT8
from qcal_export.spec.granularity import PerAxis, PerTensor

FORMATS = {"int8": INT8, "uint8": UINT8, "fp8": FP8_E4M3}


def with_outliers(shape, fmt, seed: int) -> np.ndarray:
    """Student-t rows of spread gains, a few values far larger; tiny values for FP8's zero."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(4.0, size=shape) * np.geomspace(0.02, 50, shape[0])[:, None]
    x[rng.random(shape) < 0.002] *= 40.0
    if fmt is FP8_E4M3:
        x[rng.random(shape) < 0.4] *= 1e-6
    if fmt is UINT8:
        x += np.abs(x).mean(axis=1, keepdims=True)
    return x.astype(F32)


def searches(cal, x: np.ndarray, granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU search's winners and the float64 chunked search's, ``[G]`` each."""
    groups = granularity.groups(torch.from_numpy(x))
    lo, hi = torch.aminmax(groups, dim=1)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    assert shrink_cpu.applies(cal, groups, lo, hi)
    return shrink_cpu.search(cal, groups, lo, hi), cal._search_chunks(groups, lo, hi)


def count_exact(monkeypatch) -> list[int]:
    """Spy on float64 rescoring: the number of groups rescored per call."""
    calls: list[int] = []
    original = shrink_cpu._Scorer.exact

    def exact(self, k, rows, groups=None):
        if groups is None:
            calls.append(int(rows.sum()))
        return original(self, k, rows, groups)

    monkeypatch.setattr(shrink_cpu._Scorer, "exact", exact)
    return calls


@pytest.mark.parametrize("gran_name", ["tensor", "channel"])
@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_cpu_search_matches_float64_search_and_oracle(fmt_name, gran_name):
    fmt = FORMATS[fmt_name]
    shape, granularity = ((1, 40000), PerTensor()) if gran_name == "tensor" else ((48, 600), None)
    granularity = granularity or PerAxis(0)
    x = with_outliers(shape, fmt, seed=len(fmt_name) + len(gran_name))
    cal = ShrinkMseCalibrator(fmt, granularity)
    cpu, chunks = searches(cal, x, granularity)
    assert torch.equal(cpu, chunks)
    assert (cpu > 0).any() or gran_name == "tensor"  # some group's winner is shrunk
    cal = run(ShrinkMseCalibrator(fmt, granularity), [x])
    values = x.reshape(1, -1) if gran_name == "tensor" else x
    running, _, _ = oracle([(values, x)], quant_for(fmt))
    assert_equals_oracle(cal, fmt, granularity, x.shape, running)


def test_groups_whose_largest_values_err_more_are_left_out(monkeypatch):
    """Rows with one huge value: clipping it costs more than any shrink saves, so the later
    candidates are scored for the other rows only; the winners stay the float64 ones."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(32, 800)).astype(F32)
    x[::2, 0] = 60.0
    scored = []
    original = shrink_cpu._Scorer.approximate

    def approximate(self, k, rows):
        scored.append(int(rows.sum()))
        return original(self, k, rows)

    monkeypatch.setattr(shrink_cpu._Scorer, "approximate", approximate)
    cpu, chunks = searches(ShrinkMseCalibrator(INT8, PerAxis(0)), x, PerAxis(0))
    assert torch.equal(cpu, chunks)
    assert scored[0] == 32 and min(scored) <= 16
    assert (cpu[::2] == 0).all() and (cpu[1::2] > 0).any()


@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_ties_are_decided_in_float64(fmt_name, monkeypatch):
    """Values on a coarse grid, and rows of zeros that every candidate scores alike: those groups
    are rescored in float64 and the earliest of equal errors wins, as in the float64 search."""
    fmt = FORMATS[fmt_name]
    rng = np.random.default_rng(11)
    x = (rng.integers(-3, 4, size=(24, 400)) * 0.25).astype(F32)
    if fmt is UINT8:
        x += 0.75
    x[:8] = 0.0
    calls = count_exact(monkeypatch)
    cal = ShrinkMseCalibrator(fmt, PerAxis(0), maxshrink=0.5, grid=40, norm=2.0)
    cpu, chunks = searches(cal, x, PerAxis(0))
    assert torch.equal(cpu, chunks)
    assert sum(calls) > 0


@pytest.mark.parametrize("norm", [1.0, 2.0, 2.4, 3.0])
@pytest.mark.parametrize("magnitude", [1e-9, 1.0, 1e9])
@pytest.mark.parametrize("fmt_name", ["int8", "fp8"])
def test_float32_errors_are_within_their_bound(fmt_name, magnitude, norm):
    fmt = FORMATS[fmt_name]
    x = with_outliers((16, 3000), fmt, seed=13) * F32(magnitude)
    cal = ShrinkMseCalibrator(fmt, PerAxis(0), norm=norm)
    groups = torch.from_numpy(x)
    lo, hi = groups.amin(dim=1).clamp(max=0.0), groups.amax(dim=1).clamp(min=0.0)
    scorer = shrink_cpu._Scorer(cal, groups, lo, hi)
    rows = torch.ones(len(x), dtype=torch.bool)
    bound = shrink_cpu.relative_bound(norm)
    for k in (0, 7, 19):
        approximate, exact = scorer.approximate(k, rows), scorer.exact(k, rows)
        assert ((approximate - exact).abs() <= bound * exact + x.shape[1] * 2.0**-125).all()
        assert not torch.equal(approximate, exact)


def test_large_values_or_norms_take_the_float64_search():
    x = torch.tensor([[1e13, -2.0, 3.0]])
    lo, hi = torch.tensor([-2.0]), torch.tensor([1e13])
    assert not shrink_cpu.applies(ShrinkMseCalibrator(INT8, PerTensor()), x, lo, hi)
    small = torch.tensor([[1.0, -2.0, 3.0]])
    assert not shrink_cpu.applies(ShrinkMseCalibrator(INT8, PerTensor(), norm=4.0), small, lo, hi)
    assert shrink_cpu.applies(ShrinkMseCalibrator(INT8, PerTensor()), small, lo, -lo)

"""Property tests (hypothesis), continued: merging split data, and the MSE family never doing
worse than the max range it has among its candidates. Strategies: property_cases.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from property_cases import CASES, SHAPES, arrays, block_scales, build, max_range

from qcal_export.spec.formats import NVFP4
from qcal_export.spec.granularity import PerBlock

# 3. merge of split data ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["max", "percentile", "entropy", "mse", "nvfp4-mse"])
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_merge_of_split_data_equals_one_pass(method, data):
    """Bit-equal: max/min merge exactly, histograms rebin exactly, and a loss of two batches is
    ``0 + a + b`` in one pass and ``a + b`` merged."""
    fmt, granularity = data.draw(st.sampled_from(CASES[method]))
    shape = data.draw(SHAPES)
    first, second = data.draw(arrays(shape)), data.draw(arrays(shape))
    initial = {}
    if method in ("mse", "nvfp4-mse"):  # one initial range for all three, from all the data
        amin0, amax0 = max_range(fmt, granularity, [first, second])
        initial = {
            "mse": {"amin0": amin0, "amax0": amax0},
            "nvfp4-mse": {"global_amax": amax0.abs().max()},
        }[method]
    whole = build(method, fmt, granularity, [first, second], **initial)
    merged = build(method, fmt, granularity, [first], **initial)
    merged.merge_(build(method, fmt, granularity, [second], **initial).state_dict())
    for key, value in whole.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key
    for got, want in zip(merged.compute_range(), whole.compute_range(), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(merged.compute_amax(), whole.compute_amax())


@settings(max_examples=25, deadline=None)
@given(case=st.sampled_from(CASES["shrink-mse"]), shape=SHAPES, data=st.data())
def test_shrink_mse_merge_is_the_batch_weighted_mean(case, shape, data):
    """The declared approximation: running min/max become ``(n_a r_a + n_b r_b) / (n_a + n_b)``."""
    fmt, granularity = case
    batches = [data.draw(arrays(shape)) for _ in range(3)]
    mine = build("shrink-mse", fmt, granularity, batches[:1])
    theirs = build("shrink-mse", fmt, granularity, batches[1:])
    a, b = mine.state_dict(), theirs.state_dict()
    mine.merge_(b)
    state = mine.state_dict()
    assert state["batches"].item() == 3
    assert torch.equal(state["absmax"], torch.maximum(a["absmax"], b["absmax"]))
    running_min = ((a["weighted_min"] + b["weighted_min"]) / 3).float()
    running_max = ((a["weighted_max"] + b["weighted_max"]) / 3).float()
    amin, amax = (granularity.flatten(v) for v in mine.compute_range())
    if fmt.symmetric:
        bound = torch.maximum(running_min.abs(), running_max.abs())
        running_min, running_max = -bound, bound
    assert torch.equal(amin, running_min) and torch.equal(amax, running_max)


# 5. the MSE family does no worse than max -----------------------------------------------------


def group_errors(cal, x: np.ndarray, amin, amax, norm: float = 2.0) -> torch.Tensor:
    """``sum |xq - x| ** norm`` per group ``[G]`` (float64) for a range of export shape."""
    fmt, granularity = cal.fmt, cal.granularity
    groups = granularity.groups(torch.from_numpy(x))
    scale, zero_point = fmt.scale_zero_point(granularity.flatten(amin), granularity.flatten(amax))
    xq = fmt.fake_quant(groups, scale[:, None], zero_point[:, None])
    return (xq.double() - groups.double()).abs().pow(norm).sum(dim=1)


def block_errors(cal, x: np.ndarray, effective: torch.Tensor, norm: float = 2.0) -> torch.Tensor:
    """The same for nvfp4 ``PerBlock``: blocks ``[G, 16]`` with effective scales ``[G]``."""
    groups = cal.granularity.groups(torch.from_numpy(x))
    xq = cal.fmt.fake_quant_blocks(groups, effective[:, None])
    return (xq.double() - groups.double()).abs().pow(norm).sum(dim=1)


def assert_no_worse(chosen: torch.Tensor, reference: torch.Tensor) -> None:
    """Per group, up to float64 summation order (the calibrators sum in chunks)."""
    assert not torch.isnan(chosen).any()
    assert (chosen <= reference * (1 + 1e-12)).all(), (chosen, reference)


@settings(max_examples=40, deadline=None)
@given(case=st.sampled_from(CASES["mse"]), x=SHAPES.flatmap(arrays))
def test_mse_error_is_never_above_the_max_range_error(case, x):
    """Multipliers 0.5, 0.75, 1.0, 1.25, 1.5: the max range (m = 1) is a candidate."""
    fmt, granularity = case
    cal = build("mse", fmt, granularity, [x], start=0.5, stop=1.5, step=0.25)
    assert 1.0 in cal.multipliers.tolist()
    chosen = group_errors(cal, x, *cal.compute_range())
    assert_no_worse(chosen, group_errors(cal, x, *max_range(fmt, granularity, [x])))


@settings(max_examples=40, deadline=None)
@given(case=st.sampled_from(CASES["shrink-mse"]), x=SHAPES.flatmap(arrays))
def test_shrink_mse_error_is_never_above_the_max_range_error(case, x):
    """One batch: the running range is that batch's winner, and p = 1 (the first) is max."""
    fmt, granularity = case
    cal = build("shrink-mse", fmt, granularity, [x])
    reference = MaxLike(cal, x)
    if fmt is NVFP4 and isinstance(granularity, PerBlock):
        chosen = block_errors(cal, x, block_scales(cal), cal.norm)
        assert_no_worse(chosen, block_errors(cal, x, block_scales(reference), cal.norm))
        return
    chosen = group_errors(cal, x, *cal.compute_range(), norm=cal.norm)
    assert_no_worse(chosen, group_errors(cal, x, *max_range(fmt, granularity, [x]), cal.norm))


class MaxLike:
    """The max range in the shape ``block_scales`` reads: the block abs-max and global amax."""

    def __init__(self, cal, x: np.ndarray):
        self.fmt, self.granularity = cal.fmt, cal.granularity
        self._amax = max_range(cal.fmt, cal.granularity, [x])[1]
        self._global = cal.compute_global_amax()

    def compute_amax(self) -> torch.Tensor:
        return self._amax

    def compute_global_amax(self) -> torch.Tensor:
        return self._global


@settings(max_examples=40, deadline=None)
@given(case=st.sampled_from(CASES["nvfp4-mse"]), x=SHAPES.flatmap(arrays))
def test_nvfp4_mse_error_is_never_above_the_default_block_scale_error(case, x):
    """The default block scale ``fp8(block_amax / 6 / global_scale)`` is one of the 126."""
    fmt, granularity = case
    cal = build("nvfp4-mse", fmt, granularity, [x])
    assert torch.equal(cal.compute_global_amax(), max_range(fmt, granularity, [x])[1].abs().max())
    chosen = block_errors(cal, x, block_scales(cal))
    assert_no_worse(chosen, block_errors(cal, x, block_scales(MaxLike(cal, x))))

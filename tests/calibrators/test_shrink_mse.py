"""ShrinkMseCalibrator against a float64 brute force of the sequential observer definition
(shrink_oracle.py), for every strategy: tensor, channel, group, group by g_idx, 2-D block, token
and both nvfp4 forms; the early stop and the moving average (edges, merges, options and the
pipeline: test_shrink_mse_state.py)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from shrink_cases import CASES, assert_equals_oracle, case_of, quant_for, run
from shrink_oracle import (
    F32,
    F64,
    expected_range,
    fp8_block_scale,
    global_scale_of,
    last_axis_blocks,
    make_batches,
    nvfp4_block_quant,
    nvfp4_global_quant,
    oracle,
    sequential_search,
)

from qcal_export.calibrate.tensor import tensor_scales
from qcal_export.calibrators import shrink_mse
from qcal_export.calibrators.max import MaxCalibrator
from qcal_export.calibrators.shrink_mse import ShrinkMseCalibrator
from qcal_export.spec.formats import FP8_E4M3, INT4, INT8, NVFP4, UINT8
from qcal_export.spec.granularity import (
    PerAxis,
    PerBlock,
    PerTensor,
    PerTensorGroup,
)
from qcal_export.spec.recipe import TensorSpec

# tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_every_strategy_matches_the_float64_oracle(case):
    fmt, gran, shape, group = case_of(case)
    data = make_batches(shape, fmt, seed=zlib.crc32(case.encode()))
    cal = run(ShrinkMseCalibrator(fmt, gran), data)
    running, _, shrunk = oracle([(group(x), x) for x in data], quant_for(fmt))
    assert_equals_oracle(cal, fmt, gran, shape, running)
    assert cal.state_dict()["batches"].item() == 3
    assert max(shrunk) > 0  # the search is not degenerate: some range was shrunk


def nvfp4_cases(form, data):
    """(granularity, oracle batches, quant factory) of one nvfp4 form for [rows, 40] batches."""
    if form == "tensor-group":
        batches = [(last_axis_blocks(x, 16)[None], x) for x in data]
        return PerTensorGroup(-1, 16), batches, lambda seen: nvfp4_global_quant

    def running_absmax(seen):
        return nvfp4_block_quant(max(np.abs(x).max() for x in seen))

    return PerBlock(-1, 16), [(last_axis_blocks(x, 16), x) for x in data], running_absmax


@pytest.mark.parametrize("form", ["tensor-group", "block"])
def test_nvfp4_forms_match_the_float64_oracle(form):
    data = make_batches((12, 40), NVFP4, seed=21)
    gran, batches, make_quant = nvfp4_cases(form, data)
    cal = run(ShrinkMseCalibrator(NVFP4, gran), data)
    running, _, shrunk = oracle(batches, make_quant)
    assert_equals_oracle(cal, NVFP4, gran, (12, 40), running)
    assert max(shrunk) > 0
    global_amax = cal.compute_global_amax()
    if form == "block":  # the running abs-max of every batch fixed the global scale
        assert global_amax.item() == max(np.abs(x).max() for x in data)
    else:
        assert global_amax.item() == expected_range(NVFP4, running)[1].item()


def test_nvfp4_block_scales_of_the_export_are_the_scored_ones():
    """calibration.tensor_scales turns the winners into exactly the FP8 block scales that were
    scored, and no block's error is worse than with the unshrunk (max) block scales."""
    w = make_batches((8, 40), NVFP4, seed=5, count=1)[0]
    cal = run(ShrinkMseCalibrator(NVFP4, PerBlock(-1, 16)), [w])
    spec = TensorSpec(format="nvfp4", method="shrink-mse")
    scales = tensor_scales("w", "weight", spec, cal, PerBlock(-1, 16), torch.from_numpy(w))
    quant = nvfp4_block_quant(np.abs(w).max())
    running, _, _ = oracle([(last_axis_blocks(w, 16), w)], lambda seen: quant)
    global_scale = global_scale_of(np.abs(w).max())
    winners = fp8_block_scale(expected_range(NVFP4, running)[1], global_scale)
    assert scales.global_scale.item() == global_scale
    np.testing.assert_array_equal(scales.scale.numpy().reshape(-1), winners)
    plain = MaxCalibrator(NVFP4, PerBlock(-1, 16))
    plain.collect(torch.from_numpy(w))
    unshrunk = tensor_scales("w", "weight", spec, plain, PerBlock(-1, 16), torch.from_numpy(w))
    assert not torch.equal(unshrunk.scale, scales.scale)
    errors = [
        last_axis_blocks(np.abs(s.fake_quant_weight(torch.from_numpy(w)).numpy() - w), 16)
        for s in (scales, unshrunk)
    ]
    shrunk_error, max_error = (np.nansum(e.astype(F64) ** 2.4, axis=1) for e in errors)
    assert (shrunk_error <= max_error).all() and (shrunk_error < max_error).any()


def test_early_stop_ends_the_search_before_the_grid_does():
    """One small int4 group: the error curve is bumpy, the search stops early and misses a later
    better candidate, which a patience as long as the grid finds."""
    x = np.random.default_rng(5).standard_t(3.0, size=(1, 64)).astype(F32)
    batches = [(x, x)]
    stopped, scored, _ = oracle(batches, quant_for(INT4))
    full, full_scored, _ = oracle(batches, quant_for(INT4), patience=20)
    assert scored == [7] and full_scored == [20]
    assert full[1][0] < stopped[1][0]  # the early stop changed the answer
    for patience, expected in ((5, stopped), (20, full)):
        cal = run(ShrinkMseCalibrator(INT4, PerTensor(), patience=patience), [x])
        assert_equals_oracle(cal, INT4, PerTensor(), x.shape, expected)


def test_search_runs_the_whole_grid_while_some_group_improves():
    fmt, gran, shape, group = case_of("group-int4")
    data = make_batches(shape, fmt, seed=4)
    running, scored, _ = oracle([(group(x), x) for x in data], quant_for(fmt))
    assert scored == [20, 20, 20]
    assert_equals_oracle(run(ShrinkMseCalibrator(fmt, gran), data), fmt, gran, shape, running)


@settings(max_examples=300, deadline=None)
@given(
    errors=hnp.arrays(
        np.int64, st.tuples(st.integers(1, 30), st.integers(1, 4)), elements=st.integers(0, 5)
    ),
    patience=st.integers(1, 8),
)
def test_vectorized_early_stop_is_the_sequential_search(errors, patience):
    """The chunked search on given error matrices (small integers: many ties, stops anywhere)
    picks the sequential winners and scores exactly the candidates the sequential search does."""
    count, num_groups = errors.shape
    cal = ShrinkMseCalibrator(INT8, PerTensor(), maxshrink=1.0, grid=count, patience=patience)
    starts = []

    def given_errors(groups, lo, hi, p, scratch, previous):
        begin = round((1 - p[0].item()) * count)
        starts.extend(range(begin, begin + len(p)))
        return torch.from_numpy(errors[begin : begin + len(p)]).double(), None

    cal._errors = given_errors
    zeros = torch.zeros(num_groups)
    best = cal._search_chunks(zeros[:, None], zeros, zeros)
    expected, scored = sequential_search(errors.astype(F64), patience)
    np.testing.assert_array_equal(best.numpy(), expected)
    assert starts == list(range(scored))


def test_equal_block_scales_score_equal_across_chunks():
    """A run of candidates with one FP8 block scale that crosses a chunk boundary takes the
    error scored before the boundary (another tile shape could round the sum differently)."""
    w = make_batches((8, 64), NVFP4, seed=6, count=1)[0]
    cal = run(ShrinkMseCalibrator(NVFP4, PerBlock(-1, 16)), [w])
    groups = PerBlock(-1, 16).groups(torch.from_numpy(w))
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scratch = torch.empty(1 << 12), torch.empty(1 << 12, dtype=torch.float64)
    shrink = cal.shrink
    _, (params, last) = cal._errors(groups, lo, hi, shrink[:3], scratch, None)
    _, (following, _) = cal._errors(groups, lo, hi, shrink[3:4], scratch, None)
    same = (following == params).all(dim=0)
    marked = (params, last + 1.0)  # a marker no scoring gives
    again, _ = cal._errors(groups, lo, hi, shrink[3:6], scratch, marked)
    fresh, _ = cal._errors(groups, lo, hi, shrink[3:6], scratch, None)
    assert same.any() and not same.all()
    assert torch.equal(again[0][same], last[same] + 1.0)
    assert torch.equal(again[0][~same], fresh[0][~same])
    assert torch.equal(fresh[0][same], last[same])  # here the sums agree anyway


@pytest.mark.parametrize("patience", [1, 2, 3, 7])
@pytest.mark.parametrize("case", ["tensor-int8", "g_idx-uint4", "block-fp8"])
def test_early_stop_across_chunks_and_tiles(monkeypatch, case, patience):
    """Candidate chunks and tiles of a few columns: the sequential result."""
    monkeypatch.setattr(shrink_mse, "TILE_ELEMENTS", 64)
    fmt, gran, shape, group = case_of(case)
    data = make_batches(shape, fmt, seed=patience)
    options = dict(maxshrink=0.3, grid=50, norm=2.0, patience=patience)
    cal = run(ShrinkMseCalibrator(fmt, gran, **options), data)
    running, scored, _ = oracle([(group(x), x) for x in data], quant_for(fmt), **options)
    assert_equals_oracle(cal, fmt, gran, shape, running)
    if patience < 3:
        assert min(scored) < 15


def test_moving_average_over_four_batches():
    fmt, gran, shape, group = case_of("group-uint4")
    data = make_batches(shape, fmt, seed=9, count=4)
    for constant in (0.01, 0.3, 1.0):
        cal = ShrinkMseCalibrator(fmt, gran, averaging_constant=constant)
        running, _, _ = oracle([(group(x), x) for x in data], quant_for(fmt), constant=constant)
        assert_equals_oracle(run(cal, data), fmt, gran, shape, running)
    last, _, _ = oracle([(group(x), x) for x in data[-1:]], quant_for(fmt))
    assert_equals_oracle(cal, fmt, gran, shape, last)  # constant 1: the last batch only
    first = run(ShrinkMseCalibrator(fmt, gran, averaging_constant=0.3), data[:1])
    only_first, _, _ = oracle([(group(data[0]), data[0])], quant_for(fmt))
    assert_equals_oracle(first, fmt, gran, shape, only_first)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.sampled_from([(1, 9), (3, 17), (5, 4)]),
    fmt=st.sampled_from([INT8, UINT8, INT4, FP8_E4M3]),
    grid=st.integers(5, 60),
    maxshrink=st.floats(0.05, 1.0),
    patience=st.integers(1, 6),
    norm=st.sampled_from([1.0, 2.0, 2.4, 3.5]),
)
def test_any_small_input_matches_the_oracle(seed, shape, fmt, grid, maxshrink, patience, norm):
    if int(maxshrink * grid) < 1:
        return
    rng = np.random.default_rng(seed)
    data = [(rng.standard_t(2.0, size=shape) * rng.uniform(0.01, 100)).astype(F32) for _ in "ab"]
    options = dict(maxshrink=maxshrink, grid=grid, norm=norm, patience=patience)
    cal = run(ShrinkMseCalibrator(fmt, PerAxis(0), **options), data)
    running, _, _ = oracle([(x, x) for x in data], quant_for(fmt), **options)
    assert_equals_oracle(cal, fmt, PerAxis(0), shape, running)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", [*CASES, "nvfp4-tensor-group", "nvfp4-block"])
def test_cuda_matches_the_float64_oracle(case):
    if case.startswith("nvfp4-"):
        fmt, shape = NVFP4, (12, 40)
        data = make_batches(shape, fmt, seed=21)
        gran, batches, make_quant = nvfp4_cases(case.removeprefix("nvfp4-"), data)
    else:
        fmt, gran, shape, group = case_of(case)
        data = make_batches(shape, fmt, seed=zlib.crc32(case.encode()))
        batches, make_quant = [(group(x), x) for x in data], quant_for(fmt)
    cal = ShrinkMseCalibrator(fmt, gran)
    for x in data:
        cal.collect(torch.from_numpy(x).cuda())
    assert cal.compute_amax().is_cuda
    running, _, _ = oracle(batches, make_quant)
    assert_equals_oracle(cal, fmt, gran, shape, running)

"""What AWQ keeps of a layer input: the mean |x| per channel over every finite row, and the rows
whose index over all rows collected is a multiple of the stride (at most ``limit``); states
saved and merged."""

from __future__ import annotations

import numpy as np
import torch

from qcal_export.calibrate.awq_sample import InputSample


def batches(seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.normal(0, 2, (2, n, 6)).astype(np.float32)) for n in (5, 9, 3)]


def test_mean_and_rows_are_every_strided_row():
    sample = InputSample(limit=10)
    for x in batches():
        sample.collect(x)
    rows = torch.cat([x.reshape(-1, 6) for x in batches()])  # 34 rows
    np.testing.assert_allclose(
        sample.mean_abs.numpy(), rows.double().abs().mean(dim=0).numpy(), rtol=1e-12
    )
    assert sample.count == 34 and sample.stride == 4
    torch.testing.assert_close(sample.rows, rows[::4], rtol=0, atol=0)


def test_rows_with_a_nan_are_left_out():
    sample = InputSample(limit=100)
    x = torch.ones(4, 3)
    x[1, 2] = float("nan")
    x[3, 0] = float("inf")
    sample.collect(x * torch.tensor([1.0, 2.0, 3.0]))
    assert sample.count == 2 and sample.rows.shape == (2, 3)
    np.testing.assert_array_equal(sample.mean_abs.numpy(), [1.0, 2.0, 3.0])


def test_snapshot_restores_and_merge_adds():
    first, second, both = InputSample(8), InputSample(8), InputSample(8)
    one, two, three = batches(1)
    first.collect(one)
    second.collect(two)
    second.collect(three)
    both.restore(first.snapshot())
    both.merge_(second.state_dict())
    all_rows = torch.cat([x.reshape(-1, 6) for x in (one, two, three)])
    np.testing.assert_allclose(
        both.mean_abs.numpy(), all_rows.double().abs().mean(dim=0).numpy(), rtol=1e-12
    )
    assert both.count == 34 and both.rows.shape[0] <= 8
    kept = {tuple(r.tolist()) for r in both.rows}
    assert kept <= {tuple(r.tolist()) for r in all_rows}
    empty = InputSample(8)
    empty.merge_(InputSample(8).state_dict())
    assert empty.mean_abs is None and empty.rows is None

"""A block-scaled weight's grid of block amaxes for the report (artifacts/block_grid.py): each
cell the mean log2 amax of its blocks, against a float64 brute force; at most GRID x GRID."""

from __future__ import annotations

import math

import numpy as np
import torch

from qcal_export.artifacts.block_grid import GRID, block_grid
from qcal_export.spec.granularity import PerAxis, PerBlock
from qcal_export.spec.scales import TensorScales


def _weight(amax: torch.Tensor, granularity) -> TensorScales:
    return TensorScales(
        name="w",
        kind="weight",
        format="int4",
        method="max",
        granularity=granularity,
        amax=amax,
        scale=amax / 7,
        zero_point=torch.zeros_like(amax),
    )


def test_cells_average_their_blocks_log2_amax():
    gen = torch.Generator().manual_seed(0)
    amax = torch.rand(70, 5, generator=gen) * 3 + 0.01
    amax[0:3, 0] = 0.0  # the first cell's blocks all zero: no value
    grid = block_grid(_weight(amax, PerBlock(axis=0, size=32)))
    assert grid["shape"] == [70, 5] and grid["cell"] == [3, 1]
    cells = grid["log2_amax"]
    assert len(cells) == math.ceil(70 / 3) <= GRID and all(len(r) == 5 for r in cells)
    assert cells[0][0] is None
    values = amax.double().numpy()
    logs = np.log2(np.where(values > 0, values, 1.0))
    for r in range(len(cells)):
        for c in range(5):
            if (r, c) == (0, 0):
                continue
            want = logs[3 * r : 3 * r + 3, c].mean()
            assert abs(cells[r][c] - want) <= 5e-4, (r, c)
    assert grid["min"] == 0.0 and grid["max"] == float(amax.max())


def test_large_weights_stay_within_the_grid():
    amax = torch.full((4096, 300), 0.5)
    grid = block_grid(_weight(amax, PerBlock(axis=1, size=16)))
    assert len(grid["log2_amax"]) <= GRID and len(grid["log2_amax"][0]) <= GRID
    assert {v for row in grid["log2_amax"] for v in row} == {-1.0}


def test_no_grid_without_block_scales():
    assert block_grid(_weight(torch.ones(8), PerAxis(0))) is None

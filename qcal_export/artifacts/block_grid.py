"""A block-scaled weight's block amaxes as a small grid for the report's heat map: the blocks
averaged (in log2) over cells, at most ``GRID`` x ``GRID`` cells whatever the weight's size."""

from __future__ import annotations

import math
from typing import Any

import torch

from qcal_export.spec.granularity import PerBlock, PerBlock2D
from qcal_export.spec.scales import TensorScales

GRID = 32
"""Most cells per side of the grid a report holds per weight."""


def block_grid(s: TensorScales) -> dict[str, Any] | None:
    """The block amaxes of ``s`` (a weight with block scales) as ``log2_amax`` cells
    (rows x cols lists, each cell the mean log2 of its blocks' amax, None where all are 0),
    with the blocks' ``shape``, the blocks per ``cell`` and the ``min``/``max`` amax of any
    block; None for a weight without block scales."""
    if s.kind != "weight" or not isinstance(s.granularity, PerBlock | PerBlock2D):
        return None
    amax = s.amax.detach().float().cpu()
    if amax.dim() == 0 or amax.numel() < 2:
        return None
    plane = amax.reshape(-1, amax.shape[-1]) if amax.dim() > 1 else amax.reshape(1, -1)
    rows, cols = plane.shape
    cell = (math.ceil(rows / GRID), math.ceil(cols / GRID))
    logs = torch.where(plane > 0, plane.clamp_min(1e-38).log2(), torch.nan)
    pad = (0, -cols % cell[1], 0, -rows % cell[0])
    padded = torch.nn.functional.pad(logs, pad, value=torch.nan)
    tiles = padded.reshape(padded.shape[0] // cell[0], cell[0], padded.shape[1] // cell[1], -1)
    means = tiles.nanmean(dim=(1, 3))
    return {
        "shape": list(amax.shape),
        "cell": list(cell),
        "min": float(amax.min()),
        "max": float(amax.max()),
        "log2_amax": [[None if math.isnan(v) else round(v, 3) for v in r] for r in means.tolist()],
    }

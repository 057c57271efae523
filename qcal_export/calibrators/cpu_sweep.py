"""Shared by the torch candidate sweeps (mse, shrink-mse): cache-sized tiles, and the values that
every candidate quantizes to 0, set apart so that their error is computed once, not per candidate.

A value whose quotient by the smallest candidate scale rounds to 0 rounds to 0 under every
larger scale (a correctly rounded quotient is monotone in the divisor): its error is ``|x| ** p``
for all of them. With a wide range per tensor (outliers) most values are such.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from qcal_export.spec.formats import Format

TILE_ELEMENTS = 1 << 18
"""Candidates x values scored at once: the float32 and float64 scratch stay in a core's cache."""
ZERO_SHARE = 0.25
"""Values set apart only where at least this share of a group's values is zero for all
candidates: below it the copy of the others costs more than it saves."""
SAMPLE_STEP = 64


def tiles(rows: int, cols: int, per_tile: int, align: int) -> Iterator[tuple[slice, slice]]:
    """Row and column ranges of at most ``per_tile`` elements (one row at the least); widths a
    multiple of ``align``. None for an empty ``[rows, 0]``."""
    width = min(cols, max(align, per_tile // align * align))
    if width == 0:
        return
    height = max(1, per_tile // width)
    for row in range(0, rows, height):
        for col in range(0, cols, width):
            yield slice(row, row + height), slice(col, col + width)


def split_zeros(
    fmt: Format, groups: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The values of one group that not every candidate quantizes to 0, ``[1, m]``, and the
    group with 0 in their place, ``[n]`` (its error sums are those of the values set apart);
    None where that does not pay (see ``ZERO_SHARE``).

    ``groups`` ``[1, n]`` finite float32; ``scale`` the candidates' float32 scales (any shape).
    Int formats round ``x / scale`` half to even (0 for ``|x / scale| <= 0.5``), FP8 E4M3 to its
    grid (0 for ``|x / scale| <= 2 ** -10``, half its smallest subnormal); a block format's
    scales come from its blocks, which a split would break. A sample of every ``SAMPLE_STEP``-th
    value decides first whether the split can pay (only the cost depends on it).
    """
    if groups.shape[0] != 1 or fmt.block_size > 1 or groups.is_cuda:
        return None
    limit = 0.5 if fmt.integer else 2.0**-10
    smallest = scale.min()
    sample = groups[0, ::SAMPLE_STEP]
    if int(torch.count_nonzero(torch.div(sample, smallest).abs_() <= limit)) < (
        ZERO_SHARE * len(sample)
    ):
        return None
    keep = torch.div(groups[0], smallest).abs_() > limit
    index = keep.nonzero().squeeze(1)
    if len(index) > (1 - ZERO_SHARE) * groups.shape[1]:
        return None
    return groups[0].index_select(0, index)[None], torch.where(keep, 0.0, groups[0])

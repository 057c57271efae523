"""Calibrators whose update reads each batch's group minima and maxima (max, the histograms):
on the CPU those extremes are the finiteness check as well, so a finite batch is read twice
for them instead of three times."""

from __future__ import annotations

import torch

from qcal_export.calibrators.base import Calibrator


def group_extremes(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (min, max) of ``[G, n]``; NaN propagates. ``amin`` and ``amax`` rather than
    ``aminmax``: faster along a dim on the CPU (benchmarks/results/design_notes.md)."""
    return groups.amin(dim=1), groups.amax(dim=1)


class RangedCalibrator(Calibrator):
    """A calibrator whose ``_update`` takes the batch's group extremes (``batch_extremes``)."""

    _ranges: tuple[torch.Tensor, torch.Tensor] | None = None
    """Per-group (min, max) of the batch ``_drop_nonfinite`` checked, for ``_update``."""

    def _drop_nonfinite(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | int]:
        """On the CPU the batch's group extremes are the finiteness check: a NaN or an infinity
        makes one of them non-finite (both propagate NaN). Any other batch goes the general
        way."""
        self._ranges = None
        if x.is_cuda:
            return super()._drop_nonfinite(x)
        extremes = group_extremes(self.granularity.groups(x))
        if bool(torch.isfinite(extremes[0]).all() and torch.isfinite(extremes[1]).all()):
            self._ranges = extremes
            return x, 0
        return super()._drop_nonfinite(x)

    def batch_extremes(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The extremes ``_drop_nonfinite`` found for this batch, else those of ``groups``."""
        ranges, self._ranges = self._ranges, None
        return ranges if ranges is not None else group_extremes(groups)

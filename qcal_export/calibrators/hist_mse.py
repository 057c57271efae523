"""Histogram MSE calibrator: the mse method's candidates scored on the collected histogram.

Where ``mse`` quantizes every value once per candidate (a second pass over the data, after a max
pass), this one counts a histogram in one pass and scores the same candidates ``amax0 * m`` on it
(``amax0`` the observed range), as TensorRT's and ModelOpt's histogram calibrators do for their
``mse`` method. The values of a bin are taken as spread evenly over it: each occupied bin is
scored at ``SUBPOINTS`` evenly spaced points, each carrying ``1 / SUBPOINTS`` of its count, so a
quantization step a few bins wide is not aliased against the bin centres. Where an integer
grid's step is finer than those points (16-bit grids), the points would alias against the grid
instead: there a value in range costs the uniform rounding error ``step ** 2 / 12`` and a value
outside it its clipping error. Scores are in float64.
"""

from __future__ import annotations

import torch

from qcal_export.calibrators.histogram import BINS, HistogramCalibrator
from qcal_export.calibrators.mse import mse_multipliers
from qcal_export.errors import CalibrationError
from qcal_export.spec.choices import NonFinite
from qcal_export.spec.formats import Format
from qcal_export.spec.granularity import Granularity

SUBPOINTS = 8
"""Points a bin is scored at: a step of two bins (the finest the default grid gives int8) is
then sampled at sixteen points."""
CHUNK_POINTS = 1 << 22
"""Candidates x points fake-quantized at once (float32 scratch of 16 MiB)."""


class HistogramMseCalibrator(HistogramCalibrator):
    """Range ``(amin0 * m, amax0 * m)`` with the least squared error over the histogram.

    ``amin0``, ``amax0``: the observed range (``-amax0`` for symmetric formats, ``amax0`` the
    largest magnitude); ``m`` the multipliers ``start + i * step`` of ``mse_multipliers``, the
    first on ties. One scale per group: block formats are refused.
    """

    def __init__(
        self,
        fmt: Format,
        granularity: Granularity,
        *,
        start: float = 0.25,
        stop: float = 4.0,
        step: float = 0.1,
        bins: int = BINS,
        nonfinite: NonFinite = NonFinite.SKIP,
    ):
        if fmt.block_size > 1:
            raise CalibrationError(
                f"hist-mse chooses one scale per group, not {fmt.name}'s block scales: use mse"
            )
        self.multipliers = mse_multipliers(start, stop, step)
        self._scored: tuple[int, torch.Tensor] | None = None
        super().__init__(fmt, granularity, bins=bins, nonfinite=nonfinite)

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate (min, max) per multiplier and group, each ``[K, G]`` float32."""
        amin, amax = (v.double() for v in self.observed_range())
        if self.fmt.symmetric:
            amax = torch.maximum(-amin, amax)
            amin = -amax
        m = self.multipliers.to(amax.device)[:, None]
        limit = torch.finfo(torch.float32).max
        return (amin[None] * m).clamp(-limit).float(), (amax[None] * m).clamp(max=limit).float()

    def losses(self) -> torch.Tensor:
        """Each candidate's squared error over each group's histogram, ``[G, K]`` float64;
        scored once per state (the decision and a report read the same), again after the
        state changes (``state_version``)."""
        version, losses = self._scored or (None, None)
        if version != self.state_version:
            losses = self._score()
            self._scored = (self.state_version, losses)
        return losses

    def _score(self) -> torch.Tensor:
        hist, width = self.histogram()
        amin, amax = self.candidates()
        scale, zero_point = self.fmt.scale_zero_point(amin, amax)
        groups, bins = hist.nonzero(as_tuple=True)
        counts = hist[groups, bins].double() / SUBPOINTS
        device = hist.device
        offsets = (torch.arange(SUBPOINTS, dtype=torch.float64, device=device) + 0.5) / SUBPOINTS
        points = ((bins - self.bins).double()[:, None] + offsets) * width[groups][:, None]
        points = points.float()
        losses = torch.zeros(hist.shape[0], amin.shape[0], dtype=torch.float64, device=device)
        step = max(1, CHUNK_POINTS // (amin.shape[0] * SUBPOINTS))
        for begin in range(0, points.shape[0], step):
            part = slice(begin, begin + step)
            g = groups[part]
            x = points[part][None]
            s, z = scale[:, g, None], zero_point[:, g, None]
            error = (self.fmt.fake_quant(x, s, z).double() - x.double()).square_()
            fine = s < width[g][None, :, None] / SUBPOINTS if self.fmt.integer else None
            if fine is not None and bool(fine.any()):
                error = torch.where(fine, self._smooth_error(x, s, z), error)
            losses.index_add_(0, g, (error.sum(-1) * counts[part]).T)
        return losses

    def _smooth_error(
        self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
    ) -> torch.Tensor:
        """An integer grid's error where its step is finer than the scoring points: a value's
        clipping error, plus ``step ** 2 / 12`` (rounding, uniform over a step) inside the
        range; ``x`` ``[1, P, S]``, ``scale``/``zero`` ``[K, P, 1]``; float64 ``[K, P, S]``."""
        x, scale, zero = x.double(), scale.double(), zero.double()
        low, high = (self.fmt.qmin - zero) * scale, (self.fmt.qmax - zero) * scale
        clipped = torch.minimum(torch.maximum(x, low), high)
        rounding = torch.where(clipped == x, scale.square() / 12, 0.0)
        return (x - clipped).square() + rounding

    def _decide(self) -> tuple[torch.Tensor, torch.Tensor]:
        amin, amax = self.candidates()
        best = self.losses().argmin(dim=1)[None]
        return amin.gather(0, best)[0], amax.gather(0, best)[0]

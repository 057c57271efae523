"""Percentile calibrator: the range that holds ``percentile`` percent of the collected values.

Symmetric formats cut on the histogram of ``|x|``, asymmetric ones ``(100 - percentile) / 200``
from each end of the signed histogram, as ONNX Runtime's Percentile calibrator does.
"""

from __future__ import annotations

import numbers

import torch

from qcal_export.calibrators.histogram import BINS, HistogramCalibrator
from qcal_export.errors import CalibrationError
from qcal_export.spec.choices import NonFinite
from qcal_export.spec.formats import Format
from qcal_export.spec.granularity import Granularity

PERCENTILE = 99.999


class PercentileCalibrator(HistogramCalibrator):
    """Range from the cumulative histogram: ``percentile`` (0, 100] of the values inside it.

    Symmetric formats: amax is the upper edge of the first ``|x|`` bin where the cumulative
    fraction reaches ``percentile / 100``. Asymmetric formats: with ``cut = (100 - percentile)
    / 200``, min is the lower edge of the first signed bin whose cumulative fraction reaches
    ``cut`` and max the upper edge of the first that reaches ``1 - cut``. Both are clamped to
    the observed range, which holds 0 (as the asymmetric formats' ranges do), so
    ``percentile=100`` gives the max calibrator's range.

    ONNX Runtime returns the lower edge of that bin, ours the upper edge (the whole bin is kept):
    on the same histogram they differ by one bin. ORT's ``num_bins`` span ``[min|x|, max|x|]``,
    ours are powers of two, 1 to 2 times as wide for the same count, so on the same data the two
    differ by up to about three ORT bins (benchmarks/bench_histogram_vs_ort.py).
    """

    def __init__(
        self,
        fmt: Format,
        granularity: Granularity,
        *,
        percentile: float = PERCENTILE,
        bins: int = BINS,
        nonfinite: NonFinite = NonFinite.SKIP,
    ):
        valid = isinstance(percentile, numbers.Real) and not isinstance(percentile, bool)
        if not (valid and 0 < percentile <= 100):
            raise CalibrationError(f"percentile must be a number in (0, 100], not {percentile!r}")
        self.percentile = float(percentile)
        super().__init__(fmt, granularity, bins=bins, nonfinite=nonfinite)

    def _decide(self) -> tuple[torch.Tensor, torch.Tensor]:
        hist, width = self.histogram()
        amin, amax = (v.double() for v in self.observed_range())
        bins = self.bins
        if self.fmt.symmetric:
            magnitude = hist[:, bins:] + hist[:, :bins].flip(1)
            upper = (first_reaching(magnitude, self.percentile / 100) + 1) * width
            bound = torch.minimum(upper, torch.maximum(-amin, amax)).float()
            return -bound, bound
        cut = (100 - self.percentile) / 200
        lower = (first_reaching(hist, cut) - bins) * width
        upper = (first_reaching(hist, 1 - cut) - bins + 1) * width
        zero = torch.zeros_like(amin)  # the range holds 0, as the asymmetric formats' does
        return lower.clamp(amin, zero).float(), upper.clamp(zero, amax).float()


def first_reaching(counts: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per row of ``counts`` ``[G, n]``, the first bin where ``cumsum / total >= fraction``.

    An empty row gives ``n`` (its range, clamped to the observed one, is then 0).
    """
    cumulative = counts.cumsum(dim=1).double()
    total = cumulative[:, -1:].clamp_min(1)
    return (cumulative / total < fraction).sum(dim=1)

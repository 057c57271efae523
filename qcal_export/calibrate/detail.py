"""What a report shows of each activation's calibration beside its scale: a compact histogram
of the values seen, the range each of its calibrators chose and, for MSE methods, the loss of
every amax candidate. Bounded whatever the run: ``REPORT_BINS`` counts and ``MAX_CANDIDATES``
losses per activation and method.

The histogram is the one a histogram calibrator of the tensor already keeps (percentile,
entropy, hist-mse; every candidate of ``auto`` shares it), else a small one
(``DETAIL_BINS``) collected beside the tensor's own calibrators when a report is asked for.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qcal_export.calibrators import Calibrator
from qcal_export.calibrators.hist_mse import HistogramMseCalibrator
from qcal_export.calibrators.histogram import HistogramCalibrator, rebin
from qcal_export.calibrators.mse import MseCalibrator
from qcal_export.spec.granularity import Granularity
from qcal_export.spec.recipe import TensorSpec
from qcal_export.spec.scales import TensorScales

DETAIL_BINS = 1024
"""Bins per sign of the small histogram collected where no calibrator keeps one."""
REPORT_BINS = 128
"""Most counts a report holds per activation: adjacent bins are summed down to it."""
MAX_CANDIDATES = 128
"""Most MSE candidates a report holds per activation and method (the best always among them)."""


class DetailHistogram(HistogramCalibrator):
    """The base histogram, collected for the report only: it decides the observed range."""

    def _decide(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._state["min"].clone(), self._state["max"].clone()


def detail_calibrators(
    cals: dict[str, Calibrator],
    specs: dict[str, tuple[str, TensorSpec]],
    granularities: dict[str, Granularity],
    nonfinite: str,
) -> dict[str, DetailHistogram]:
    """A small histogram calibrator per activation none of whose calibrators keeps one."""
    kept = {specs[k][0] for k, cal in cals.items() if isinstance(cal, HistogramCalibrator)}
    first = {}
    for key, cal in cals.items():
        first.setdefault(specs[key][0], cal)
    return {
        tensor: DetailHistogram(
            cal.fmt, granularities[tensor], bins=DETAIL_BINS, nonfinite=nonfinite
        )
        for tensor, cal in first.items()
        if tensor not in kept
    }


def activation_detail(
    cals: dict[str, Calibrator],
    specs: dict[str, tuple[str, TensorSpec]],
    found: dict[str, dict[str, TensorScales]],
    extra: dict[str, DetailHistogram],
) -> dict[str, dict[str, Any]]:
    """Per activation: ``histogram`` (or None), ``ranges`` (method -> amax, and min/max for
    asymmetric formats) of ``found`` (activation -> method -> scales) and ``mse_loss``
    (method -> candidates' amax and mean squared error per value)."""
    detail: dict[str, dict[str, Any]] = {
        tensor: {
            "histogram": None,
            "ranges": {m: scale_range(s) for m, s in methods.items()},
            "mse_loss": {},
        }
        for tensor, methods in found.items()
    }
    for key, cal in cals.items():
        tensor, spec = specs[key]
        if tensor not in detail:
            continue
        if isinstance(cal, HistogramCalibrator) and detail[tensor]["histogram"] is None:
            detail[tensor]["histogram"] = compact_histogram(cal)
        loss = mse_loss(cal)
        if loss is not None:
            detail[tensor]["mse_loss"][spec.method] = loss
    for tensor, cal in extra.items():
        if tensor in detail:
            detail[tensor]["histogram"] = compact_histogram(cal)
    return detail


def scale_range(s: TensorScales) -> dict[str, float]:
    """The amax a method chose (the largest of its groups), with min and max where kept."""
    chosen = {"amax": float(s.amax.float().max())}
    if s.min is not None and s.max is not None:
        chosen.update(min=float(s.min.float().min()), max=float(s.max.float().max()))
    return chosen


def compact_histogram(cal: HistogramCalibrator) -> dict[str, Any] | None:
    """The calibrator's signed histogram over all its groups, the bins between the first and
    the last count summed into at most ``REPORT_BINS``: ``low`` (left edge of the first bin),
    ``width`` and ``counts``. None before any value was collected."""
    found = cal.histogram()
    if found is None:
        return None
    hist, width = found
    widest = width.max()
    shift = torch.log2(widest / width).round().to(torch.int64)
    counts = rebin(hist, shift).sum(dim=0).cpu()
    used = counts.nonzero().squeeze(1)
    if len(used) == 0:
        return None
    first, last = int(used[0]), int(used[-1])
    merge = math.ceil((last - first + 1) / REPORT_BINS)
    span = counts[first : last + 1]
    span = torch.cat([span, span.new_zeros(-len(span) % merge)]).view(-1, merge).sum(dim=1)
    bin_width = float(widest) * merge
    return {
        "low": (first - cal.bins) * float(widest),
        "width": bin_width,
        "counts": span.tolist(),
    }


def mse_loss(cal: Calibrator) -> dict[str, Any] | None:
    """An MSE calibrator's candidates: ``amax`` (the largest group's) and ``mse`` (summed squared
    error over all groups per value collected), at most ``MAX_CANDIDATES`` of them, the best
    kept; ``best`` its index. None for other calibrators or before any value was collected."""
    if not cal.collected:
        return None
    if isinstance(cal, HistogramMseCalibrator):
        losses = cal.losses().sum(dim=0)
        amax = torch.maximum(-cal.candidates()[0], cal.candidates()[1]).amax(dim=1)
    elif isinstance(cal, MseCalibrator):
        state = cal.state_dict()
        losses = state["losses"].sum(dim=0)
        top = torch.maximum(state["amin0"].abs(), state["amax0"].abs()).max().double()
        amax = cal.multipliers.to(top.device) * top
    else:
        return None
    losses, amax = losses.double().cpu(), amax.double().cpu()
    numel = max(float(cal.state_dict()["numel"]), 1.0)
    keep = _spread(len(losses), int(losses.argmin()))
    best = keep.index(int(losses.argmin()))
    return {
        "amax": [float(amax[i]) for i in keep],
        "mse": [float(losses[i]) / numel for i in keep],
        "best": best,
    }


def _spread(count: int, best: int) -> list[int]:
    """At most ``MAX_CANDIDATES`` indices below ``count``, evenly spread, ``best`` among them."""
    if count <= MAX_CANDIDATES:
        return list(range(count))
    picked = {round(i * (count - 1) / (MAX_CANDIDATES - 2)) for i in range(MAX_CANDIDATES - 1)}
    return sorted(picked | {best})

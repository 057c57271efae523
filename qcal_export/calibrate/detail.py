"""What a report shows of each activation's calibration beside its scale: a compact histogram
of the values seen, the range each of its calibrators chose and, for MSE methods, the loss of
every amax candidate. Bounded whatever the run: ``REPORT_BINS`` counts and ``MAX_CANDIDATES``
losses per activation and method.

The histogram is the one a histogram calibrator of the tensor already keeps (percentile,
entropy, hist-mse; every candidate of ``auto`` shares it), else one of a sample of each batch
(``DetailHistogram``) collected beside the tensor's own calibrators when a report is asked for:
its cost stays near a max calibrator's whatever the batch size.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from qcal_export.calibrators import Calibrator
from qcal_export.calibrators.base import MergeOp
from qcal_export.calibrators.hist_mse import HistogramMseCalibrator
from qcal_export.calibrators.histogram import HistogramCalibrator, rebin
from qcal_export.calibrators.max import MaxCalibrator
from qcal_export.calibrators.mse import MseCalibrator
from qcal_export.spec.granularity import PerTensor
from qcal_export.spec.recipe import TensorSpec
from qcal_export.spec.scales import TensorScales

DETAIL_BINS = 1024
"""Bins per sign of the histogram collected where no calibrator keeps one."""
SAMPLE_VALUES = 1 << 14
"""Most values of a batch that histogram counts: few enough for one thread's pass."""
REPORT_BINS = 128
"""Most counts a report holds per activation: adjacent bins are summed down to it."""
MAX_CANDIDATES = 128
"""Most MSE candidates a report holds per activation and method (the best always among them)."""


class DetailHistogram(HistogramCalibrator):
    """The base histogram of a sample of each batch, for the report only: at most
    ``SAMPLE_VALUES`` values, every ``step``-th, the step coprime with a sample's size so that
    every position (channel, token) is taken alike; ``values`` counts every value of the
    batches. One group: per tensor. The exact range comes from the tensor's own calibrators
    (``activation_detail``), which read every value anyway."""

    merge_ops: ClassVar[dict[str, MergeOp]] = {**HistogramCalibrator.merge_ops, "values": "sum"}

    def collect(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        super().collect(x.detach().reshape(-1)[:: sample_step(tuple(x.shape))])
        self._state["values"] += x.numel()

    @property
    def values(self) -> int:
        return int(self._state["values"]) if self._state else 0

    def _init_state(self, groups: torch.Tensor) -> dict[str, torch.Tensor]:
        values = torch.zeros((), dtype=torch.float64, device=groups.device)
        return {**super()._init_state(groups), "values": values}

    def _decide(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._state["min"].clone(), self._state["max"].clone()


def sample_step(shape: tuple[int, ...]) -> int:
    """The least step that takes at most ``SAMPLE_VALUES`` values of a tensor of ``shape`` and
    is coprime with the size of one sample (every axis but the first)."""
    numel = math.prod(shape)
    inner = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, -(-numel // SAMPLE_VALUES))
    while step > 1 and math.gcd(step, inner) != 1:
        step += 1
    return step


def detail_calibrators(
    cals: dict[str, Calibrator], specs: dict[str, tuple[str, TensorSpec]], nonfinite: str
) -> dict[str, DetailHistogram]:
    """A sampled histogram (``DetailHistogram``) per activation none of whose calibrators
    keeps a histogram."""
    kept = {specs[k][0] for k, cal in cals.items() if isinstance(cal, HistogramCalibrator)}
    first = {}
    for key, cal in cals.items():
        first.setdefault(specs[key][0], cal)
    return {
        tensor: DetailHistogram(cal.fmt, PerTensor(), bins=DETAIL_BINS, nonfinite=nonfinite)
        for tensor, cal in first.items()
        if tensor not in kept
    }


def activation_detail(
    cals: dict[str, Calibrator],
    specs: dict[str, tuple[str, TensorSpec]],
    found: dict[str, dict[str, TensorScales]],
    extra: dict[str, DetailHistogram],
    firsts: dict[str, Calibrator],
) -> dict[str, dict[str, Any]]:
    """Per activation: ``histogram`` (or None), ``ranges`` (method -> amax, and min/max for
    asymmetric formats) of ``found`` (activation -> method -> scales) and ``mse_loss``
    (method -> candidates' amax and mean squared error per value). ``cals`` and ``firsts`` (a
    first pass's calibrators, by the same keys as in ``specs``) hold the histograms, losses and
    the range seen."""
    detail: dict[str, dict[str, Any]] = {
        tensor: {
            "histogram": None,
            "ranges": {m: scale_range(s) for m, s in methods.items()},
            "mse_loss": {},
        }
        for tensor, methods in found.items()
    }
    seen: dict[str, tuple[float, float]] = {}
    for key, cal in [*firsts.items(), *cals.items()]:
        tensor, spec = specs[key]
        if tensor not in detail:
            continue
        if tensor not in seen and seen_range(cal) is not None:
            seen[tensor] = seen_range(cal)
        if isinstance(cal, HistogramCalibrator) and detail[tensor]["histogram"] is None:
            detail[tensor]["histogram"] = compact_histogram(cal)
        loss = mse_loss(cal)
        if loss is not None:
            detail[tensor]["mse_loss"][spec.method] = loss
    for tensor, cal in extra.items():
        if tensor in detail:
            detail[tensor]["histogram"] = compact_histogram(cal, seen.get(tensor))
    return detail


def seen_range(cal: Calibrator) -> tuple[float, float] | None:
    """The (min, max) of every value a max or histogram calibrator saw, including 0; None for
    other calibrators, or before any value was collected."""
    if not cal.collected:
        return None
    if isinstance(cal, HistogramCalibrator):
        amin, amax = cal.observed_range()
    elif isinstance(cal, MaxCalibrator):
        state = cal.state_dict()
        amin, amax = state["min"], state["max"]
    else:
        return None
    return float(amin.min()), float(amax.max())


def scale_range(s: TensorScales) -> dict[str, float]:
    """The amax a method chose (the largest of its groups), with min and max where kept."""
    chosen = {"amax": float(s.amax.float().max())}
    if s.min is not None and s.max is not None:
        chosen.update(min=float(s.min.float().min()), max=float(s.max.float().max()))
    return chosen


def compact_histogram(
    cal: HistogramCalibrator, seen: tuple[float, float] | None = None
) -> dict[str, Any] | None:
    """The calibrator's signed histogram over all its groups, the bins between the first and
    the last count summed into at most ``REPORT_BINS``: ``low`` (left edge of the first bin),
    ``width`` and ``counts``, with ``min``/``max`` of the values seen (``seen``, else the
    calibrator's own range) and ``values``, their count (the counts may be of a sample:
    ``DetailHistogram``). None before any value was collected."""
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
    low, high = seen or seen_range(cal)
    sampled = isinstance(cal, DetailHistogram)
    return {
        "low": (first - cal.bins) * float(widest),
        "width": float(widest) * merge,
        "counts": span.tolist(),
        "min": low,
        "max": high,
        "values": cal.values if sampled else int(span.sum()),
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

"""Entropy calibrator: the symmetric threshold that keeps the most information when the signed
histogram is quantized, by KL divergence (TensorRT, GTC 2017 s7310; ONNX Runtime's Entropy).

All windows of ``i`` bins each side of zero are scored at once, each in ``O(quantized_bins)``:
every sum over a window's bins comes from prefix sums over the histogram.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F

from qcal_export.calibrators.histogram import BINS, HistogramCalibrator, integer_option
from qcal_export.errors import CalibrationError
from qcal_export.spec.choices import NonFinite
from qcal_export.spec.formats import Format
from qcal_export.spec.granularity import Granularity

QUANTIZED_BINS = 256
"""Default quantized bins over a window of ``i`` bins each side (at most ``2 * bins``): 128 each
side, int8's magnitudes (as TensorRT's entropy calibrator merges ``|x|`` into 128 bins). ORT's 128
over both sides would model 7 bits and start the search at 64 bins each side. Integer formats of
more levels (16 bits) model their own grid: ``default_quantized_bins``."""
MAX_CLIPPED = 1e-3
"""Largest share of the values a threshold may clip. KL weighs each bin by its share of the
values, so a tensor with most of its mass near zero (softmax, attention, post-sigmoid) scores best
with a window that resolves the near-zero mass and clips the few large values that carry the
signal: attention peaks clipped to a quarter of their value. Saturating 1 value in 1000 is
clipping signal, not outliers."""
EPS = 1e-4
"""What smoothing puts in an empty bin (taken off the others), as ONNX Runtime and MXNet do."""
MAX_BINS = 4999
"""Smoothing takes at most ``2 * bins * EPS`` off a nonzero count: below 1, p never empties."""
CHUNK_ELEMENTS = 1 << 20
"""Groups x windows x quantized bins scored at once on the host (float64 scratch of 8 MiB per
buffer: cache-sized)."""
DEVICE_CHUNK_ELEMENTS = 1 << 23
"""The same on a GPU (64 MiB per buffer): there each chunk costs its kernel launches, so fewer,
larger chunks."""
SERIES_TOLERANCE = 1e-18
"""Where the series of a window's smoothed self-information stops (absolute, in counts)."""


class EntropyCalibrator(HistogramCalibrator):
    """Threshold ``T = i * w`` minimizing ``KL(p || q)`` over windows ``i = ceil(Q/2) .. bins``.

    On the signed histogram (``2 * bins`` bins of width ``w``, zero at the middle edge), the
    window of ``i`` bins each side gives ``p``: its counts with the values outside folded into
    its two edge bins; and ``q``: its counts (outliers not folded in) merged into
    ``Q = quantized_bins`` bins of ``2i // Q`` bins (the remainder into the last), each spread
    evenly over the bins where ``p`` is nonzero. Both are smoothed (an empty bin gets ``1e-4``,
    taken evenly off the others; a window whose smoothing leaves a bin <= 0 or whose ``q`` is
    empty is not a candidate) and normalized. A window that clips more than ``max_clipped`` of
    the values is not a candidate either. The smallest KL wins, the first on ties.
    Symmetric formats get ``amax = min(T, abs-max)``, asymmetric ``(max(-T, min), min(T, max))``.

    Differences from ONNX Runtime's ``get_entropy_threshold``, on purpose: ``quantized_bins``
    defaults to 256 (ORT: 128, 64 each side), and no window clips more than ``max_clipped``
    (ORT and TensorRT have no such bound: see ``MAX_CLIPPED``); its window has ``i``
    bins left of zero and ``i + 1`` right, ours is symmetric; its ``q`` is truncated to
    integers, ours stays float; its ``q`` leaves the last quantized bin's remainder bins empty
    and fills bins where ``p`` is 0, ours spreads over ``p``'s nonzero bins as MXNet (which it
    cites) does. Its histogram has ``num_bins`` bins over ``[-abs-max, abs-max]``; ours has
    ``bins`` each side, so ``bins=2048`` is at least as fine as ORT's ``num_bins=2048``.
    """

    def __init__(
        self,
        fmt: Format,
        granularity: Granularity,
        *,
        bins: int = BINS,
        quantized_bins: int | None = None,
        max_clipped: float = MAX_CLIPPED,
        nonfinite: NonFinite = NonFinite.SKIP,
    ):
        bins = integer_option("bins", bins, 2, MAX_BINS)
        if quantized_bins is None:
            quantized_bins = default_quantized_bins(fmt, bins)
        self.quantized_bins = integer_option("quantized_bins", quantized_bins, 2, 2 * bins)
        real = isinstance(max_clipped, numbers.Real) and not isinstance(max_clipped, bool)
        if not (real and 0 < max_clipped <= 1):
            raise CalibrationError(f"max_clipped must be a number in (0, 1], not {max_clipped!r}")
        self.max_clipped = float(max_clipped)
        super().__init__(fmt, granularity, bins=bins, nonfinite=nonfinite)

    def compute_divergence(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(window half-widths ``i`` ``[W]`` int64, ``KL(p || q)`` ``[G, W]`` float64, inf for
        windows that are not candidates); None before collect."""
        if not self._state:
            return None
        return window_divergence(self._state["hist"], self.quantized_bins, self.max_clipped)

    def _decide(self) -> tuple[torch.Tensor, torch.Tensor]:
        half, divergence = self.compute_divergence()
        best = divergence.argmin(dim=1)
        best = best.where(torch.isfinite(divergence).any(dim=1), len(half) - 1)
        _, width = self.histogram()
        threshold = half[best] * width
        amin, amax = (v.double() for v in self.observed_range())
        if self.fmt.symmetric:
            bound = torch.minimum(threshold, torch.maximum(-amin, amax)).float()
            return -bound, bound
        return torch.maximum(-threshold, amin).float(), torch.minimum(threshold, amax).float()


def default_quantized_bins(fmt: Format, bins: int) -> int:
    """Quantized bins that model ``fmt``'s levels, at most the ``2 * bins`` of the histogram.

    8-bit and float formats: ``QUANTIZED_BINS``. A 16-bit format's 65536 levels are more bins
    than any histogram here holds (``2 * MAX_BINS``): with ``2 * bins`` quantized bins the one
    window is the whole histogram, unmerged, so the range is the observed one (max's), as KL
    finds where the rounding it would weigh is below the histogram's resolution. A
    ``quantized_bins`` option is taken as given.
    """
    levels = fmt.qmax - fmt.qmin + 1 if fmt.integer else QUANTIZED_BINS
    return min(max(QUANTIZED_BINS, levels), 2 * bins)


class _Sums(NamedTuple):
    """A histogram chunk ``[g, 2B]`` (float64) and the exclusive prefix sums over its bins."""

    counts: torch.Tensor
    count: torch.Tensor
    occupied: torch.Tensor
    xlogx: torch.Tensor
    log: torch.Tensor
    inverse: torch.Tensor

    @classmethod
    def of(cls, hist: torch.Tensor) -> _Sums:
        counts = hist.double()
        nonzero = counts > 0
        log = torch.where(nonzero, counts.log(), 0)
        return cls(
            counts=counts,
            count=_prefix(counts),
            occupied=_prefix(nonzero.double()),
            xlogx=_prefix(counts * log),
            log=_prefix(log),
            inverse=torch.where(nonzero, 1 / counts, 0),
        )


def window_divergence(
    hist: torch.Tensor, quantized_bins: int, max_clipped: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL divergence of every window of ``hist`` ``[G, 2 * bins]``: (``i`` ``[W]``, ``[G, W]``),
    inf for windows that clip more than ``max_clipped`` of the values.

    Chunks of groups and of windows bound the scratch to about ``CHUNK_ELEMENTS`` float64s
    (``DEVICE_CHUNK_ELEMENTS`` on a GPU); the narrow windows that clip too much for every group
    of a chunk are not scored.
    """
    num, bins = hist.shape[0], hist.shape[1] // 2
    half = torch.arange(math.ceil(quantized_bins / 2), bins + 1, device=hist.device)
    divergence = torch.empty(num, len(half), dtype=torch.float64, device=hist.device)
    chunk = CHUNK_ELEMENTS if hist.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    group_step = max(1, chunk // (8 * bins))
    window_step = max(1, chunk // (min(group_step, num) * (quantized_bins + 1)))
    for g in range(0, num, group_step):
        sums = _Sums.of(hist[g : g + group_step])
        first = _first_admitted(sums, half, max_clipped)
        divergence[g : g + group_step, :first] = math.inf
        for w in range(first, len(half), window_step):
            windows = half[w : w + window_step]
            divergence[g : g + group_step, w : w + window_step] = _divergence(
                sums, windows, quantized_bins, max_clipped
            )
    return half, divergence


def _divergence(
    sums: _Sums, half: torch.Tensor, quantized_bins: int, max_clipped: float
) -> torch.Tensor:
    """KL of the windows ``half`` ``[K]`` of one histogram chunk: ``[g, K]``, inf where the
    window is no candidate. Per quantized bin: its counts, and p's nonzero bins and mass."""
    counts, bins = sums.counts, sums.counts.shape[1] // 2
    total = sums.count[:, -1:]
    lo, hi = bins - half, bins + half
    step = torch.arange(quantized_bins + 1, device=counts.device)
    edges = lo[:, None] + (2 * half[:, None] // quantized_bins) * step
    edges[:, -1] = hi
    merged = _segments(sums.count, edges)
    occupied = _segments(sums.occupied, edges)
    left, right = sums.count[:, lo], total - sums.count[:, hi]
    first_bin, last_bin = counts[:, lo], counts[:, hi - 1]
    occupied[..., 0] += (first_bin == 0) & (left > 0)
    occupied[..., -1] += (last_bin == 0) & (right > 0)
    mass = merged.clone()
    mass[..., 0] += left
    mass[..., -1] += right
    length = 2 * half.double()
    p_occupied = occupied.sum(dim=-1)
    p_eps = EPS * (length - p_occupied) / p_occupied
    filled = merged > 0
    q_occupied = torch.where(filled, occupied, 0).sum(dim=-1)
    q_eps = EPS * (length - q_occupied) / q_occupied
    q = torch.where(filled, merged / occupied - q_eps[..., None], EPS)
    cross = torch.where(occupied > 0, (mass - occupied * p_eps[..., None]) * q.log(), 0).sum(-1)
    own = _interior_self_information(sums, lo + 1, hi - 1, p_eps)
    own = (
        own
        + _self_information(first_bin + left, p_eps)
        + _self_information(last_bin + right, p_eps)
    )
    inside = total - left - right
    divergence = (own - cross) / total - total.log() + inside.log()
    valid = (q > 0).logical_or(~filled).all(dim=-1) & (inside > 0) & divergence.isfinite()
    valid &= left + right <= max_clipped * total
    return divergence.where(valid, math.inf)


def _first_admitted(sums: _Sums, half: torch.Tensor, max_clipped: float) -> int:
    """The first window that clips at most ``max_clipped`` of some group's values: the share
    clipped only falls as windows widen, so no window before it is a candidate (``_divergence``
    would give it inf) and none need be scored."""
    bins = sums.counts.shape[1] // 2
    total = sums.count[:, -1:]
    left, right = sums.count[:, bins - half], total - sums.count[:, bins + half]
    admitted = (left + right <= max_clipped * total).any(dim=0)
    return int(admitted.int().argmax()) if bool(admitted.any()) else len(half)


def _prefix(values: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sums along the last axis: ``[g, n] -> [g, n + 1]``."""
    return F.pad(values.cumsum(dim=-1), (1, 0))


def _between(prefix: torch.Tensor, start: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """Sums over bins ``[start, stop)`` (``[K]`` each) from prefix sums ``[g, n + 1]``."""
    return prefix[:, stop] - prefix[:, start]


def _segments(prefix: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Sums between consecutive ``edges`` ``[K, Q + 1]`` from prefix sums: ``[g, K, Q]``."""
    at = prefix[:, edges]
    return at[..., 1:] - at[..., :-1]


def _self_information(count: torch.Tensor, p_eps: torch.Tensor) -> torch.Tensor:
    """``(c - eps) log(c - eps)`` of a smoothed nonzero count, 0 for an empty bin."""
    value = count - p_eps
    return torch.where(count != 0, value * value.log(), 0)


def _interior_self_information(
    sums: _Sums, start: torch.Tensor, stop: torch.Tensor, p_eps: torch.Tensor
) -> torch.Tensor:
    """``sum (c - eps) log(c - eps)`` over the nonzero bins in ``[start, stop)``: ``[g, K]``.

    By the series ``c log c - eps (log c + 1) + sum_n eps**n / (n (n - 1) c**(n - 1))``
    (``n >= 2``; it converges as ``eps < 1 <= c``), each term from prefix sums, until a term
    is below ``SERIES_TOLERANCE`` for every window.
    """
    occupied = _between(sums.occupied, start, stop)
    value = _between(sums.xlogx, start, stop) - p_eps * (_between(sums.log, start, stop) + occupied)
    finite = p_eps[p_eps.isfinite()]
    largest = float(finite.max()) if finite.numel() else 0.0
    power, n = sums.inverse, 2
    while largest**n * sums.counts.shape[1] > SERIES_TOLERANCE * n * (n - 1):
        value = value + p_eps**n / (n * (n - 1)) * _between(_prefix(power), start, stop)
        power = power * sums.inverse
        n += 1
    return value

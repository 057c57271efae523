"""Histogram calibrators' shared state: a signed histogram per group with power-of-two bin width.

The width ``2**e`` is the smallest power of two with ``bins * 2**e > abs-max``, so a value's bin
``floor(x * 2**-e)`` is exact in float32, and when a batch widens the range the counts move
exactly: bin ``k`` (counted from zero) goes to ``k >> (e' - e)``. Batches in any order, or states
merged across processes, give the histogram of all the data at once, in ``[G, 2 * bins]``.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Sequence
from typing import ClassVar

import torch

from qcal_export.calibrators import kernels
from qcal_export.calibrators.base import Calibrator, MergeOp
from qcal_export.calibrators.ranged import RangedCalibrator, group_extremes
from qcal_export.calibrators.threads import sharing_pool
from qcal_export.errors import CalibrationError
from qcal_export.spec.choices import NonFinite
from qcal_export.spec.formats import Format
from qcal_export.spec.granularity import Granularity

BINS = 2048
LOWEST_EXPONENT = -126
"""Exponent of an all-zero group's bin width: ``2**-e`` stays a finite float32 for every e."""
CHUNK_ELEMENTS = 1 << 20
"""Values binned at once: bounds the index scratch whatever the batch size."""
MAX_SHIFT = 62
ROUNDING_MAGIC = {
    torch.float32: (12582912.0, torch.int32, 0x4B400000),
    torch.float64: (6755399441055744.0, torch.int64, 0x4338000000000000),
}
"""Per float type: ``1.5 * 2**mantissa_bits``, the integer type of its width and that float's
bits. An integer-valued float ``v`` (``|v|`` below ``2**(mantissa_bits - 1)``) plus the magic
number is exact, and its bits minus the magic's are ``v``: the bin index without a conversion,
which on the CPU costs more than the arithmetic."""


def integer_option(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]``; CalibrationError naming ``name`` otherwise.

    Integral floats (recipe options are numbers) are accepted; booleans are not.
    """
    integral = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if integral and float(value).is_integer():
        number = int(value)
        if number >= minimum and (maximum is None or number <= maximum):
            return number
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    raise CalibrationError(f"{name} must be an integer {bound}, not {value!r}")


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Float64 ``2**exponent`` built from its bits: exact on every device (int64 ``[G]``)."""
    return ((exponent + 1023) << 52).view(torch.float64)


def bin_exponent(absmax: torch.Tensor, bins: int) -> torch.Tensor:
    """Smallest ``e >= LOWEST_EXPONENT`` with ``bins * 2**e > absmax``; int64 ``[G]``."""
    value = absmax.to(torch.float64)
    exponent = torch.frexp(value / bins).exponent.to(torch.int64)
    exponent = torch.where(bins * pow2(exponent - 1) > value, exponent - 1, exponent)
    exponent = torch.where(bins * pow2(exponent) <= value, exponent + 1, exponent)
    return exponent.where(value > 0, LOWEST_EXPONENT).clamp_min(LOWEST_EXPONENT)


def rebin(hist: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Counts ``[G, 2 * bins]`` with every group's bin width multiplied by ``2**shift[g]``.

    Signed bin ``k`` (``k = index - bins``) goes to ``k >> shift``: arithmetic shifts floor, so
    negative bins stay negative and the move is exact.
    """
    bins = hist.shape[1] // 2
    signed = torch.arange(-bins, bins, device=hist.device)
    target = (signed[None] >> shift.clamp(0, MAX_SHIFT)[:, None]) + bins
    return torch.zeros_like(hist).scatter_add_(1, target, hist)


class HistogramCalibrator(RangedCalibrator):
    """Collects a signed histogram of ``2 * bins`` bins per group; subclasses only decide.

    Signed bin ``j`` counts values in ``[(j - bins) w, (j - bins + 1) w)`` with ``w = 2**e`` per
    group: the first ``bins`` hold negative values, the last ``bins`` the others. Non-finite
    values are counted and left out of the histogram (not counted as zeros), and so are the
    zeros a granularity pads a partial last block with.

    State: ``hist`` ``[G, 2 * bins]`` int64, ``exponent`` ``[G]`` int64, ``min``/``max`` ``[G]``
    float32 (the observed range, which includes 0). ``hist`` merges by sum once both sides have
    the merged (max) exponent; ``merge_`` aligns them first.
    """

    merge_ops: ClassVar[dict[str, MergeOp]] = {
        **Calibrator.merge_ops,
        "hist": "sum",
        "exponent": "max",
        "min": "min",
        "max": "max",
    }
    nonfinite_fill: ClassVar[float] = math.nan
    """Skipped non-finite values become NaN, which ``_update`` leaves out."""

    def __init__(
        self,
        fmt: Format,
        granularity: Granularity,
        *,
        bins: int = BINS,
        nonfinite: NonFinite = NonFinite.SKIP,
    ):
        self.bins = integer_option("bins", bins, 2)
        super().__init__(fmt, granularity, nonfinite=nonfinite)

    def histogram(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(counts ``[G, 2 * bins]`` int64, bin width ``[G]`` float64); None before collect."""
        if not self._state:
            return None
        return self._state["hist"].clone(), pow2(self._state["exponent"])

    @property
    def groups(self) -> int:
        """The histograms held (0 before collect)."""
        return self._state["hist"].shape[0] if self._state else 0

    @property
    def device(self) -> torch.device | None:
        """Where the histograms are (None before collect)."""
        return self._state["hist"].device if self._state else None

    def observed_range(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(min, max) of the finite values seen, each ``[G]`` float32 and including 0."""
        if not self._state:
            return None
        return self._state["min"].clone(), self._state["max"].clone()

    def merge_(self, state: dict[str, torch.Tensor]) -> None:
        """Fold another state in exactly: both histograms rebinned to the larger width, summed."""
        if not state or not self._state or not self._mergeable(state):
            super().merge_(state)
            return
        device = self._state["hist"].device
        their_exponent = state["exponent"].to(device)
        exponent = torch.maximum(self._state["exponent"], their_exponent)
        theirs = dict(state)
        theirs["hist"] = rebin(state["hist"].to(device), exponent - their_exponent)
        theirs["exponent"] = exponent
        self._align_(exponent)
        super().merge_(theirs)

    def _mergeable(self, state: dict[str, torch.Tensor]) -> bool:
        """Whether ``state`` passes the base checks; otherwise the base merge raises untouched."""
        return (
            state.keys() == self._state.keys()
            and all(state[k].shape == v.shape for k, v in self._state.items())
            and torch.equal(state["stat_shape"].cpu(), self._state["stat_shape"].cpu())
        )

    def _init_state(self, groups: torch.Tensor) -> dict[str, torch.Tensor]:
        num, device = groups.shape[0], groups.device
        return {
            "hist": torch.zeros(num, 2 * self.bins, dtype=torch.int64, device=device),
            "exponent": torch.full((num,), LOWEST_EXPONENT, dtype=torch.int64, device=device),
            "min": torch.zeros(num, dtype=torch.float32, device=device),
            "max": torch.zeros(num, dtype=torch.float32, device=device),
        }

    def _drop_nonfinite(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | int]:
        """Where the kernels collect (``_fused``) and non-finite values are skipped, they stay:
        ``widen_range_`` counts them and the histogram kernel leaves them out."""
        if self._fused(x) and self.nonfinite == NonFinite.SKIP:
            return x, 0
        return super()._drop_nonfinite(x)

    def _update(self, x: torch.Tensor, groups: torch.Tensor) -> None:
        left_out = self._padding(x, groups)
        state = self._state
        if self._fused(groups):
            from qcal_export.calibrators.kernels.histogram import histogram_add_
            from qcal_export.calibrators.kernels.histogram_range import widen_range_

            widen_range_(groups, state, self.bins, lowest=LOWEST_EXPONENT, max_shift=MAX_SHIFT)
            histogram_add_(state["hist"], groups, state["exponent"])
        else:
            amin, amax = self.batch_extremes(groups)
            if bool(torch.isnan(amax).any()):
                nan = torch.isnan(groups)
                left_out = nan.sum(dim=1) + (0 if left_out is None else left_out)
                groups = groups.masked_fill(nan, 0.0)
                amin, amax = group_extremes(groups)
            torch.minimum(state["min"], amin, out=state["min"])
            torch.maximum(state["max"], amax, out=state["max"])
            needed = bin_exponent(torch.maximum(-amin, amax), self.bins)
            self._align_(torch.maximum(state["exponent"], needed))
            self._count(groups)
        if left_out is not None:
            state["hist"][:, self.bins] -= left_out

    def _padding(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor | None:
        """Zeros the granularity added to fill its groups (a partial last block), per group."""
        if groups.numel() == x.numel():
            return None
        real = self.granularity.groups(torch.ones_like(x, dtype=torch.int32))
        return groups.shape[1] - real.sum(dim=1)

    def _align_(self, exponent: torch.Tensor) -> None:
        """Rebin the collected counts to the (larger or equal) ``exponent`` per group."""
        shift = exponent - self._state["exponent"]
        if bool((shift > 0).any()):
            self._state["hist"] = rebin(self._state["hist"], shift)
            self._state["exponent"] = exponent

    def _count(self, groups: torch.Tensor) -> None:
        """Add every value of ``groups`` (``[G, n]``, finite) to its group's bin.

        ``x * 2**-e`` is exact in float32 while every ``e <= 0``; a wider bin could round a tiny
        negative value to -0 (bin 0 instead of -1), so those batches bin in float64. The floored
        value becomes an index through ``ROUNDING_MAGIC``, counted by ``bincount`` (faster on
        the CPU than a scatter) where the histogram holds no more bins than the chunk values.
        On CUDA ``_update`` takes the Triton kernels instead (``kernels/histogram.py``).
        """
        hist, exponent = self._state["hist"], self._state["exponent"]
        num, length = groups.shape
        device = hist.device
        dtype = torch.float32 if bool((exponent <= 0).all()) else torch.float64
        magic, itype, bits = ROUNDING_MAGIC[dtype]
        scale = pow2(-exponent).to(dtype)[:, None]
        first_bin = torch.arange(num, device=device)[:, None] * (2 * self.bins) + self.bins
        offset = (first_bin - bits).to(itype)
        step = max(1, CHUNK_ELEMENTS // num)
        scaled = torch.empty(num * min(step, length), dtype=dtype, device=device)
        ones = torch.ones((), dtype=torch.int64, device=device).expand(scaled.numel())
        for begin in range(0, length, step):
            part = groups[:, begin : begin + step]
            size = part.numel()
            bins = scaled[:size].view(part.shape)
            torch.mul(part, scale, out=bins).floor_().add_(magic)
            index = bins.view(itype).add_(offset).view(-1)
            if hist.numel() <= size:
                hist.view(-1).add_(torch.bincount(index, minlength=hist.numel()))
            else:
                hist.view(-1).index_add_(0, index, ones[:size])

    def _fused(self, groups: torch.Tensor) -> bool:
        """Whether the Triton kernels collect ``groups`` (CUDA and Triton); torch is the
        reference."""
        return groups.is_cuda and kernels.HAS_TRITON


def decide_together(cals: Sequence[HistogramCalibrator]) -> None:
    """Decide ``cals`` in one ``_decide`` over their histograms side by side, each keeping its
    share (``keep_decision``): one batch of operations instead of one per calibrator, which
    on a GPU is what the decisions cost. ``cals`` are of one class, built with the same
    arguments, collected, with the same number of groups, on one device; every decision
    here is per group, so each share is what the calibrator decides alone."""
    keys = ("hist", "exponent", "min", "max")
    merged = copy.copy(cals[0])
    merged.restore({k: torch.cat([cal._state[k] for cal in cals]) for k in keys})
    amin, amax = merged._decide()
    size = cals[0].groups
    for k, cal in enumerate(cals):
        cal.keep_decision(amin[k * size : (k + 1) * size], amax[k * size : (k + 1) * size])


def decide_apart(cals: Sequence[HistogramCalibrator], workers: int) -> None:
    """Decide each of ``cals`` (collected, on the host) on its own, ``workers`` at a time (the
    cores shared among their torch operations), and keep the decisions (``keep_decision``):
    a decision is many small operations, which run side by side better than one by one."""
    with sharing_pool(workers, "qcal-decide") as pool:
        for cal, (amin, amax) in zip(cals, pool.map(_decision, cals), strict=True):
            cal.keep_decision(amin, amax)


def _decision(cal: HistogramCalibrator) -> tuple[torch.Tensor, torch.Tensor]:
    return cal._decide()

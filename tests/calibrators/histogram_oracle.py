"""Float64 oracles of the histogram calibrators, written plainly from their definitions, and the
data their tests share.

Nothing here calls the package's histogram code: bin widths come from a loop over exponents,
bins from ``floor(x / w)`` in float64, percentiles from a running sum over bins, and the entropy
search from a Python loop over windows and quantized bins. A plain module, imported by name.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from qcal_export.spec.granularity import PerTensor

LOWEST_EXPONENT = -126
EPS = 1e-4


# data ---------------------------------------------------------------------------------------


def make_batches(kind: str, *, channels: int = 6, seed: int = 0, positive: bool = False):
    """Four float32 batches ``[b, 9, C]`` whose range grows batch by batch; channels scaled
    from 0.01 to 30, so per-axis groups get their own bin widths."""
    rng = np.random.default_rng(seed)
    gains = np.geomspace(0.01, 30.0, channels)
    out = []
    for b, grow in zip((30, 70, 20, 50), (0.2, 1.0, 3.0, 0.5), strict=True):
        shape = (b, 9, channels)
        if kind == "normal":
            x = rng.normal(size=shape)
        elif kind == "student-t":
            x = rng.standard_t(1.5, size=shape)
        elif kind == "outliers":
            x = rng.normal(size=shape)
            where = rng.random(shape) < 0.003
            x[where] *= 80.0
        else:  # "spiky": few distinct values, many empty bins and exact bin edges
            x = rng.choice(
                [-2.0, -0.5, 0.0, 0.25, 1.0, 3.0], size=shape, p=[0.1, 0.2, 0.3, 0.2, 0.15, 0.05]
            )
        x = x * gains * grow
        if positive:
            x = np.abs(x) - 0.05 * gains
        out.append(x.astype(np.float32))
    return out


def groups_of(data: list[np.ndarray], granularity) -> list[np.ndarray]:
    """Float64 values of each group (rows of the granularity), non-finite values dropped."""
    if isinstance(granularity, PerTensor):
        rows = [np.concatenate([d.reshape(-1) for d in data])]
    else:
        axis = granularity.axis
        parts = [np.moveaxis(d, axis, 0).reshape(d.shape[axis], -1) for d in data]
        rows = list(np.concatenate(parts, axis=1))
    return [r[np.isfinite(r)].astype(np.float64) for r in rows]


def collect_all(cal, data: list[np.ndarray]):
    for d in data:
        cal.collect(torch.from_numpy(d))
    return cal


# the histogram ------------------------------------------------------------------------------


def exponent_of(absmax: float, bins: int) -> int:
    """Smallest e >= LOWEST_EXPONENT with bins * 2**e > absmax."""
    e = LOWEST_EXPONENT
    while bins * 2.0**e <= absmax:
        e += 1
    return e


def histogram(rows: list[np.ndarray], bins: int):
    """(counts [G, 2 bins] int64, width [G], min [G], max [G]) of float64 finite rows.

    Signed bin j counts x with (j - bins) * w <= x < (j - bins + 1) * w; min and max include 0.
    """
    counts = np.zeros((len(rows), 2 * bins), dtype=np.int64)
    width, amin, amax = np.zeros(len(rows)), np.zeros(len(rows)), np.zeros(len(rows))
    for g, v in enumerate(rows):
        absmax = float(np.abs(v).max()) if v.size else 0.0
        width[g] = 2.0 ** exponent_of(absmax, bins)
        for x in v:
            counts[g, math.floor(x / width[g]) + bins] += 1
        amin[g] = min(0.0, float(v.min())) if v.size else 0.0
        amax[g] = max(0.0, float(v.max())) if v.size else 0.0
    return counts, width, amin, amax


# percentile ---------------------------------------------------------------------------------


def first_bin_reaching(counts, fraction: float) -> int:
    total, running = int(sum(counts)), 0
    for k, c in enumerate(counts):
        running += int(c)
        if total and running / total >= fraction:
            return k
    return len(counts)


def percentile_range(counts, width, amin, amax, percentile, symmetric):
    """(min, max) of one group: see PercentileCalibrator's docstring, read as plain loops."""
    bins = len(counts) // 2
    if symmetric:
        magnitude = [counts[bins + k] + counts[bins - 1 - k] for k in range(bins)]
        k = first_bin_reaching(magnitude, percentile / 100)
        bound = min((k + 1) * width, max(-amin, amax))
        return -bound, bound
    cut = (100 - percentile) / 200
    lower = (first_bin_reaching(counts, cut) - bins) * width
    upper = (first_bin_reaching(counts, 1 - cut) - bins + 1) * width
    return min(max(lower, amin), 0.0), max(min(upper, amax), 0.0)


# entropy ------------------------------------------------------------------------------------


def smooth(v: np.ndarray) -> np.ndarray | None:
    """Zeros get EPS, taken evenly off the nonzero entries; None if empty or a bin gets <= 0."""
    zero = v == 0
    if zero.all():
        return None
    taken = EPS * zero.sum() / (~zero).sum()
    out = np.where(zero, EPS, v - taken)
    return out if (out > 0).all() else None


def window_kl(
    counts: np.ndarray, half: int, quantized_bins: int, max_clipped: float = 1.0
) -> float:
    """KL(p || q) of the window of ``half`` bins each side of zero (inf if no candidate, or if it
    clips more than ``max_clipped`` of the values)."""
    bins = len(counts) // 2
    lo, hi = bins - half, bins + half
    if counts[:lo].sum() + counts[hi:].sum() > max_clipped * counts.sum():
        return math.inf
    window = counts[lo:hi].astype(np.float64)
    p = window.copy()
    p[0] += counts[:lo].sum()
    p[-1] += counts[hi:].sum()
    length = 2 * half
    merged_width = length // quantized_bins
    q = np.zeros(length)
    for c in range(quantized_bins):
        start = c * merged_width
        stop = length if c == quantized_bins - 1 else start + merged_width
        nonzero = p[start:stop] != 0
        if nonzero.any():
            q[start:stop][nonzero] = window[start:stop].sum() / nonzero.sum()
    p, q = smooth(p), smooth(q)
    if p is None or q is None:
        return math.inf
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def entropy_search(
    counts: np.ndarray, quantized_bins: int, max_clipped: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(half-widths i, KL per window) for one group."""
    halves = np.arange(math.ceil(quantized_bins / 2), len(counts) // 2 + 1)
    kl = [window_kl(counts, int(i), quantized_bins, max_clipped) for i in halves]
    return halves, np.array(kl)


def entropy_range(counts, width, amin, amax, quantized_bins, symmetric, max_clipped=1.0):
    """(min, max) of one group: the first window with the smallest KL, clamped."""
    halves, kl = entropy_search(counts, quantized_bins, max_clipped)
    best = int(np.argmin(kl)) if np.isfinite(kl).any() else len(halves) - 1
    threshold = halves[best] * width
    if symmetric:
        bound = min(threshold, max(-amin, amax))
        return -bound, bound
    return max(-threshold, amin), min(threshold, amax)

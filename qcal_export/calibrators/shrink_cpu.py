"""The shrink-mse search on the CPU: candidates one at a time, scored cheaply where that decides,
exactly where it does not; the same winners as scoring every candidate in float64.

Each candidate's error is first taken in float32 (``exp(norm * log|xq - x|)`` summed in
float64), within ``relative_bound`` of the float64 error. A group's comparison with its best so
far is decided there unless the two lie within the bounds; only those groups are scored again in
float64 (the best's exact error too, once). Before that, groups whose ``BOUND_VALUES`` largest
values alone err more than the best (clipping shows there first) are left out: the candidate
cannot win them. The early stop is the sequential one, so no candidate past it is scored.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qcal_export.calibrators.cpu_sweep import TILE_ELEMENTS, split_zeros, tiles

BOUND_VALUES = 32
"""Values of largest magnitude per group whose float64 error bounds the group's from below."""
FLOAT32_SAFE = 1e12
"""Largest magnitude scored in float32 first: ``(2 * 1e12) ** norm`` stays finite there for
norms up to 3. Beyond it (or for larger norms) every candidate is scored in float64."""
LOG_RANGE = 104.0
"""``|ln d|`` of any positive float32 ``d`` (subnormals included) is at most this."""
SUM_RUN = 1024
"""Float32 terms summed in float32 before the float64 sum."""
SUM_MARGIN = 1e-7
"""Relative slack for float64 sums of the same terms in another order (their rounding is far
below it for any group of fewer than ``2 ** 29`` values)."""


def relative_bound(norm: float) -> float:
    """Bound on ``|float32 error - float64 error| / float64 error`` of each term whose float32
    power is a normal number (below, the difference is at most ``2 ** -126``).

    ``d`` rounded once (2 ** -24), ``log`` and ``exp`` within 2 ulp each, the product
    ``norm * log d`` rounded, and ``norm`` itself rounded to float32, each error times the
    largest ``|log d|``; plus the float32 sums of ``SUM_RUN`` terms.
    """
    ulp = 2.0**-23
    norm32 = float(torch.tensor(norm, dtype=torch.float32))
    log_error = (2 * ulp * norm + ulp / 2 * norm) * LOG_RANGE
    term = norm * ulp / 2 + log_error + 2 * ulp + abs(norm32 - norm) * LOG_RANGE
    return term + SUM_RUN * ulp / 2


def applies(cal: Any, groups: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> bool:
    """CPU, a format with one scale per group (not block scales) and values small enough for
    float32 powers of the norm."""
    if groups.is_cuda or cal.fmt.block_size > 1 or groups.numel() == 0:
        return False
    largest = float(torch.maximum(-lo.min(), hi.max()))
    return largest <= FLOAT32_SAFE and cal.norm * math.log(2 * FLOAT32_SAFE) < 80


def search(cal: Any, groups: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Index of each group's winning candidate, ``[G]``: ``ShrinkMseCalibrator``'s sequential
    search. ``cal`` is the calibrator (its format, norm, patience, candidates and Q -> DQ)."""
    num = groups.shape[0]
    shrink = cal.shrink
    groups, common = _set_zeros_apart(cal, groups, lo, hi, shrink)
    largest = _largest(groups)
    scorer = _Scorer(cal, groups, lo, hi)
    best = torch.zeros(num, dtype=torch.int64)
    best_error = torch.full((num,), math.inf, dtype=torch.float64)
    best_exact = torch.full((num,), math.nan, dtype=torch.float64)
    bound = relative_bound(cal.norm)
    band = 2 * bound * (1 + 2 * bound) + SUM_MARGIN
    slack = groups.shape[1] * 2.0**-124
    idle = 0
    for k in range(len(shrink)):
        live = torch.ones(num, dtype=torch.bool)
        if largest is not None and k > 0:
            lower = scorer.exact(k, live, largest) + common
            live = lower <= best_error * (1 + band) + slack
        error = torch.full((num,), math.inf, dtype=torch.float64)
        error[live] = scorer.approximate(k, live) + common[live]
        near = (error - best_error).abs() <= band * torch.maximum(error, best_error) + slack
        near &= live & torch.isfinite(best_error)
        better = (error < best_error) & ~near
        if bool(near.any()):
            missing = near & torch.isnan(best_exact)
            for j in best[missing].unique().tolist():
                chosen = missing & (best == j)
                best_exact[chosen] = scorer.exact(j, chosen) + common[chosen]
            exact = scorer.exact(k, near) + common[near]
            wins = torch.zeros(num, dtype=torch.bool)
            wins[near] = exact < best_exact[near]
            better |= wins
            best_exact[near] = torch.where(wins[near], exact, best_exact[near])
        best_exact[better & ~near] = math.nan
        best = torch.where(better, k, best)
        best_error = torch.where(better, error, best_error)
        idle = 0 if bool(better.any()) else idle + 1
        if idle >= cal.patience:
            break
    return best


class _Scorer:
    """One candidate's summed error per group: float32 powers (``approximate``) or float64
    (``exact``, ``cal._errors``), for the groups of a mask."""

    def __init__(self, cal: Any, groups: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
        self.cal, self.groups, self.lo, self.hi = cal, groups, lo, hi
        size = min(TILE_ELEMENTS, max(groups.numel(), 1))
        self.scratch = (torch.empty(size), torch.empty(size, dtype=torch.float64))
        self.norm = torch.tensor(cal.norm, dtype=torch.float32)

    def _params(self, k: int, rows: torch.Tensor) -> torch.Tensor:
        p = self.cal.shrink[k]
        amin = (p * self.lo[rows].double()).float()[None]
        amax = (p * self.hi[rows].double()).float()[None]
        return self.cal._qparams(amin, amax)

    def approximate(self, k: int, rows: torch.Tensor) -> torch.Tensor:
        """``sum exp(norm * log|xq - x|)`` in float32 terms, float64 sums, ``[rows.sum()]``.

        The rows of a mask are gathered a tile at a time (the copy stays in cache)."""
        index = None if bool(rows.all()) else rows.nonzero().squeeze(1)
        count = self.groups.shape[0] if index is None else len(index)
        params = self._params(k, rows)
        errors = torch.zeros(count, dtype=torch.float64)
        scratch, wide = self.scratch
        size = len(scratch) // 2
        for r, c in tiles(count, self.groups.shape[1], size, 1):
            if index is None:
                x = self.groups[r, c]
            else:
                columns, part = self.groups[:, c], index[r]
                x = scratch[size : size + len(part) * columns.shape[1]].view(len(part), -1)
                torch.index_select(columns, 0, part, out=x)
            out = scratch[: x.numel()].view(1, *x.shape)
            self.cal._fake_quant(out, x, params[:, :, r, None])
            out.sub_(x).abs_().log_().mul_(self.norm).exp_()
            errors[r] += _row_sums(out[0], wide)
        return errors

    def exact(self, k: int, rows: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """Float64 ``sum |xq - x| ** norm`` of candidate ``k``, ``[rows.sum()]`` (of ``groups``
        where given: the largest values)."""
        groups = self.groups if groups is None else groups
        p = self.cal.shrink[k : k + 1]
        args = (groups[rows], self.lo[rows], self.hi[rows], p, self.scratch, None)
        return self.cal._errors(*args)[0][0]


def _row_sums(terms: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
    """Float64 sums of the rows of ``terms`` ``[r, c]`` (float32, not negative): float32 sums of
    ``SUM_RUN`` terms (each within ``SUM_RUN * 2 ** -24`` of its exact sum, in any order), then
    float64. ``wide``: float64 scratch of ``terms``' size at least."""
    rows, cols = terms.shape
    whole = cols // SUM_RUN * SUM_RUN
    sums = wide[:rows].view(rows).zero_()
    if whole:
        runs = terms[:, :whole].reshape(rows, -1, SUM_RUN).sum(-1)
        sums += runs.sum(-1, dtype=torch.float64)
    if whole < cols:
        sums += terms[:, whole:].sum(-1, dtype=torch.float64)
    return sums


def _set_zeros_apart(
    cal: Any, groups: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, shrink: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``groups`` less the values every candidate quantizes to 0 (one group), and their summed
    error ``|x| ** norm``, ``[G]`` float64 (zeros where none were set apart)."""
    common = torch.zeros(groups.shape[0], dtype=torch.float64)
    amin = (shrink[:, None] * lo.double()[None]).float()
    amax = (shrink[:, None] * hi.double()[None]).float()
    split = split_zeros(cal.fmt, groups, cal._qparams(amin, amax)[0])
    if split is None:
        return groups, common
    rest, zeros = split
    return rest, common + zeros.double().abs_().pow_(cal.norm).sum()


def _largest(groups: torch.Tensor) -> torch.Tensor | None:
    """Each group's ``BOUND_VALUES`` values of largest magnitude, ``[G, m]``; None for one
    group or groups of few values (the bound would cost about what it saves)."""
    if groups.shape[0] == 1 or groups.shape[1] <= 4 * BOUND_VALUES:
        return None
    index = torch.topk(groups.abs(), BOUND_VALUES, dim=1, sorted=False).indices
    return groups.gather(1, index)

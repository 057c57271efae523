"""A histogram calibrator's range step on the GPU in two launches: widen the range, then rebin.

The torch path of ``calibrators/histogram.py`` takes a batch's group extremes, its bin
exponent (``bin_exponent``) and rebins the counts (``rebin``) in a few dozen small operations;
on a GPU their launches cost the host more than the GPU spends on the whole collect. Here:

- ``_range_kernel`` folds the batch's finite values into the running ``min``/``max`` (which
  hold 0 from the start, so a non-finite value read as 0 changes nothing) with float atomics,
  and counts the non-finite values into the state's ``nonfinite``;
- ``_rebin_kernel``, one program per group, finds the smallest exponent ``e`` with
  ``bins * 2**e > max(-min, max)`` exactly (float64, as ``bin_exponent``), keeps the larger of
  it and the current one, and moves every count to its bin at that width (``k >> shift``).

The new exponent is ``max(old, bin_exponent(running range))``: the same as the torch path's
per-batch maximum, since the exponent grows with the range.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcal_export.calibrators.kernels.histogram import _column_splits, _tile
from qcal_export.calibrators.kernels.nvfp4_prep import _binade, _pow2

REBIN_BLOCK = 1024


@triton.jit(do_not_specialize=["stride_n"])
def _range_kernel(
    x_ptr,
    stride_g,
    stride_n,
    num_groups,
    n,
    cols_per_split,
    min_ptr,
    max_ptr,
    nonfinite_ptr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    split = tl.program_id(1)
    groups = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    in_group = groups < num_groups
    rows = x_ptr + groups.to(tl.int64)[:, None] * stride_g
    begin = split.to(tl.int64) * cols_per_split
    end = tl.minimum(begin + cols_per_split, n)
    low = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    high = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    bad = tl.zeros([BLOCK_G], dtype=tl.int32)
    for start in range(begin, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        inside = in_group[:, None] & (cols < end)[None, :]
        x = tl.load(rows + cols[None, :] * stride_n, mask=inside, other=0.0).to(tl.float32)
        finite = (x - x) == 0.0  # NaN and +-Inf give NaN
        value = tl.where(finite, x, 0.0)
        low = tl.minimum(low, value)
        high = tl.maximum(high, value)
        bad += tl.sum((inside & ~finite).to(tl.int32), axis=1)
    tl.atomic_min(min_ptr + groups, tl.min(low, axis=1), mask=in_group, sem="relaxed")
    tl.atomic_max(max_ptr + groups, tl.max(high, axis=1), mask=in_group, sem="relaxed")
    tl.atomic_add(nonfinite_ptr, tl.sum(bad, axis=0).to(tl.float64), sem="relaxed")


@triton.jit
def _rebin_kernel(
    min_ptr,
    max_ptr,
    exponent_ptr,
    old_ptr,
    new_ptr,
    bins,
    LOWEST: tl.constexpr,
    SHIFT_LIMIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    group = tl.program_id(0)
    low = tl.load(min_ptr + group).to(tl.float64)
    high = tl.load(max_ptr + group).to(tl.float64)
    value = tl.maximum(-low, high)
    width = value / bins
    guess = tl.maximum(_binade(width) + 1, LOWEST)  # also value 0 (its guess is -1022)
    guess = tl.where(bins * _pow2(guess - 1) > value, guess - 1, guess)
    guess = tl.where(bins * _pow2(guess) <= value, guess + 1, guess)
    old = tl.load(exponent_ptr + group)
    exponent = tl.maximum(tl.maximum(guess, LOWEST), old)
    tl.store(exponent_ptr + group, exponent)
    shift = tl.minimum(exponent - old, SHIFT_LIMIT)
    row = group.to(tl.int64) * (2 * bins)
    for start in range(0, 2 * bins, BLOCK):
        index = start + tl.arange(0, BLOCK)
        inside = index < 2 * bins
        counts = tl.load(old_ptr + row + index, mask=inside, other=0)
        target = ((index.to(tl.int64) - bins) >> shift) + bins
        tl.atomic_add(new_ptr + row + target, counts, mask=inside & (counts != 0), sem="relaxed")


def widen_range_(
    groups: torch.Tensor,
    state: dict[str, torch.Tensor],
    bins: int,
    *,
    lowest: int,
    max_shift: int,
) -> None:
    """Fold ``groups`` (``[G, n]`` float32, bf16 or fp16 on CUDA) into a histogram state's
    ``min``, ``max`` and ``nonfinite``, then give it the exponent of the widened range (at least
    ``lowest``) and its ``hist`` rebinned to it (a new tensor; shifts past ``max_shift`` moved
    as by ``max_shift``), ready for ``histogram_add_``. No host sync."""
    num_groups, n = groups.shape
    if groups.numel():
        groups, block_g, block_n = _tile(groups)
        group_programs = triton.cdiv(num_groups, block_g)
        splits, cols_per_split = _column_splits(n, block_n, group_programs, groups.device)
        _range_kernel[(group_programs, splits)](
            groups,
            groups.stride(0),
            groups.stride(1),
            num_groups,
            n,
            cols_per_split,
            state["min"],
            state["max"],
            state["nonfinite"],
            BLOCK_G=block_g,
            BLOCK_N=block_n,
            num_warps=4,
        )
    rebinned = torch.zeros_like(state["hist"])
    _rebin_kernel[(num_groups,)](
        state["min"],
        state["max"],
        state["exponent"],
        state["hist"],
        rebinned,
        bins,
        LOWEST=lowest,
        SHIFT_LIMIT=max_shift,
        BLOCK=REBIN_BLOCK,
        num_warps=4,
    )
    state["hist"] = rebinned

"""Per-block candidate ranges for the pruned NVFP4 choice (``nvfp4_best``): the lower bounds.

For each block of 16 the kernel here scores one reference candidate ``r`` (the smallest scale
that does not clip the block's largest value ``a``) and keeps the candidates whose float64 loss
can still be at most ``L_r`` plus its float32 error bound:

- scale ``s`` clips every value ``x_i > fl(6 s)`` to ``fl(6 s)``, so the loss is at least
  ``c_i (x_i - fl(6 s))^2`` for each such value (``c_i = 1`` for squared error; for ``dᵀ H d``
  the Schur complement ``1 / (H⁻¹)_ii``, the least ``dᵀ H d`` with ``d_i`` fixed). With
  ``H``, the largest of these over the values, not the amax's alone, is what prunes: a block's
  amax may sit on a weakly weighted input channel and another clipped value on a heavily
  weighted one (on the benchmark weight the ranges kept shrink from 25.3 to 15.2 candidates);
- scale ``s >= 4 z`` rounds every value ``<= z`` to 0, each such value then adding its full
  ``x^2`` (for ``H``: at least ``c_i x_i^2`` of its largest term), and from ``4 a`` on every
  scale gives the same loss, of which the first stands for all.

Both bounds are monotone in the scale, so each block keeps one contiguous range ``[first,
end)``, loosened by 1% against the float32 rounding of computing them.
"""

# Triton's JIT builds tuples by concatenation; it does not take ``(*xs, x)``.
# ruff: noqa: RUF005

from __future__ import annotations

import triton
import triton.language as tl

from qcal_export.calibrators.kernels.nvfp4_blocks import (
    _block_hessian,
    _block_values,
    _loss_and_bound,
)


@triton.jit
def _first_at_least(scale_ptr, t, NUM_CAND: tl.constexpr, STEPS: tl.constexpr):
    """Per lane, the first candidate index ``k`` with ``scale[k] >= t`` (``NUM_CAND`` if none)."""
    lo = tl.zeros(t.shape, tl.int32)
    hi = tl.full(t.shape, NUM_CAND, tl.int32)
    for _ in tl.static_range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        s = tl.load(scale_ptr + mid, mask=active, other=0.0)
        right = active & (s < t)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (s >= t), mid, hi)
    return lo


@triton.jit
def _zero_bound_edge(xs, cs, threshold, HESSIAN: tl.constexpr):
    """The least value ``z`` whose zeroing alone (with every value below it) costs more than
    ``threshold``, or +inf: from scale ``4 z`` on, every candidate is pruned."""
    edge = tl.full(xs[0].shape, float("inf"), tl.float32)
    for j in tl.static_range(16):
        bound = tl.zeros_like(xs[0])
        for i in tl.static_range(16):
            below = xs[i] <= xs[j]
            if HESSIAN:
                bound = tl.maximum(bound, tl.where(below, cs[i] * xs[i] * xs[i], 0.0))
            else:
                bound += tl.where(below, xs[i] * xs[i], 0.0)
        edge = tl.where(bound * (1.0 / 1.01) > threshold, tl.minimum(edge, xs[j]), edge)
    return edge


@triton.jit
def _schur_floors(schur_ptr, blocks, inside, per_row):
    """The Schur floors (entry-major ``[16, per_row]``) of a tile's 16 values."""
    group = blocks % per_row
    cs = ()
    for j in tl.static_range(16):
        cs = cs + (tl.load(schur_ptr + j * per_row + group, mask=inside, other=0.0),)
    return cs


@triton.jit
def _clip_reach(xs, cs, amax, threshold, HESSIAN: tl.constexpr):
    """``6 s`` below which some value's clipping alone costs more than ``threshold``: the
    largest ``x_i - sqrt(threshold / c_i)`` (values with no floor, ``c_i = 0``, bound nothing)."""
    if HESSIAN:
        reach = tl.zeros_like(amax)
        for i in tl.static_range(16):
            gap = tl.sqrt(threshold / tl.where(cs[i] > 0, cs[i], 1.0)) * 1.01
            reach = tl.maximum(reach, tl.where(cs[i] > 0, xs[i] - gap, 0.0))
    else:
        reach = amax - tl.sqrt(threshold) * 1.01
    return reach


@triton.jit
def _candidate_range(
    scale_ptr,
    xs,
    cs,
    amax,
    threshold,
    ref,
    NUM_CAND: tl.constexpr,
    STEPS: tl.constexpr,
    HESSIAN: tl.constexpr,
):
    """``[first, end)``: the candidates whose lower bounds do not exceed ``threshold``."""
    clip_scale = _clip_reach(xs, cs, amax, threshold, HESSIAN) * (0.999 / 6.0)
    first = _first_at_least(scale_ptr, clip_scale, NUM_CAND, STEPS)
    edge = _zero_bound_edge(xs, cs, threshold, HESSIAN)
    end = _first_at_least(scale_ptr, edge * 4.004, NUM_CAND, STEPS)
    plateau = tl.minimum(_first_at_least(scale_ptr, amax * 4.004, NUM_CAND, STEPS) + 1, NUM_CAND)
    end = tl.where(edge < float("inf"), end, plateau)
    return tl.minimum(first, ref), tl.maximum(end, ref + 1)


@triton.jit(do_not_specialize=["num_blocks", "per_row"])
def _range_kernel(
    x_ptr,
    num_blocks,
    scale_ptr,
    recip_ptr,
    norm_ptr,
    h_ptr,
    rho_ptr,
    schur_ptr,
    per_row,
    range_ptr,
    key_ptr,
    NUM_CAND: tl.constexpr,
    STEPS: tl.constexpr,
    HESSIAN: tl.constexpr,
    TOL: tl.constexpr,
    LIMIT: tl.constexpr,
    TILE: tl.constexpr,
):
    """Each block's candidate range ``[first, end)`` (all of them for a block out of float32
    range), and ``first * (NUM_CAND + 1) + end`` as the key that orders the tiles."""
    blocks = tl.program_id(0) * TILE + tl.arange(0, TILE)
    inside = blocks < num_blocks
    xs, amax = _block_values(x_ptr, blocks, inside, norm_ptr)
    cs = ()
    if HESSIAN:
        cs = _schur_floors(schur_ptr, blocks, inside, per_row)
    hs, rho = _block_hessian(x_ptr, blocks, inside, h_ptr, rho_ptr, per_row, HESSIAN)
    ref = tl.minimum(_first_at_least(scale_ptr, amax * (1.0 / 6.0), NUM_CAND, STEPS), NUM_CAND - 1)
    ref_loss, ref_bound = _loss_and_bound(
        xs, hs, rho, tl.load(scale_ptr + ref), tl.load(recip_ptr + ref), HESSIAN
    )
    threshold = (ref_loss + TOL * ref_bound) * 1.001 + 1e-30
    first, end = _candidate_range(scale_ptr, xs, cs, amax, threshold, ref, NUM_CAND, STEPS, HESSIAN)
    out_of_range = (amax > LIMIT) | (ref_loss != ref_loss)
    first = tl.where(out_of_range, 0, first)
    end = tl.where(out_of_range, NUM_CAND, end)
    tl.store(range_ptr + blocks * 2, first, mask=inside)
    tl.store(range_ptr + blocks * 2 + 1, end, mask=inside)
    tl.store(key_ptr + blocks, first * (NUM_CAND + 1) + end, mask=inside)

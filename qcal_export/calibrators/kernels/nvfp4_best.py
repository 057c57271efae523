"""Each block's best NVFP4 FP8 scale, scoring only the candidates that can still win.

``nvfp4_scale_sweep`` scores all 126 candidates of every block and writes every loss, which
merging and several collects need. One collect that only wants the choice needs neither: a
first kernel (``nvfp4_ranges``) bounds each block's losses from below and keeps the contiguous
range of candidates that can still beat a reference candidate; the blocks are sorted by range,
and a second kernel scores, per tile of blocks in that order, the union of their ranges (little
wider than each). Inside it the scoring, the near-tie flags and the float64 repair of flagged
blocks are those of ``nvfp4_sweep``, so the choice is the same: the first candidate of least
float64 loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qcal_export.calibrators.kernels.nvfp4_blocks import (
    RANGE_LIMIT,
    _block_hessian,
    _block_values,
    _exact_loss,
    _flagged_values,
    _loss_and_bound,
    _track_best,
    _untracked,
)
from qcal_export.calibrators.kernels.nvfp4_prep import Operands, kernel_operands
from qcal_export.calibrators.kernels.nvfp4_ranges import _range_kernel

BEST_WARPS = 2
"""Small tiles: a tile scores the union of its blocks' ranges."""
PLAIN_BLOCKS_PER_THREAD = 2


@triton.jit(do_not_specialize=["num_blocks", "per_row"])
def _best_kernel(
    x_ptr,
    order_ptr,
    num_blocks,
    scale_ptr,
    recip_ptr,
    norm_ptr,
    h_ptr,
    rho_ptr,
    per_row,
    range_ptr,
    best_ptr,
    flag_ptr,
    flagged_ptr,
    count_ptr,
    work_ptr,
    HESSIAN: tl.constexpr,
    TOL: tl.constexpr,
    LIMIT: tl.constexpr,
    TILE: tl.constexpr,
):
    """The tile (blocks ``order[lanes]``) scores the union of its blocks' ranges; best, flags
    (1: a near tie, 2: out of float32 range), the flagged blocks appended to ``flagged`` (their
    number in ``count``) and the tile's candidate count."""
    lanes = tl.program_id(0) * TILE + tl.arange(0, TILE)
    inside = lanes < num_blocks
    blocks = tl.load(order_ptr + lanes, mask=inside, other=0)
    xs, amax = _block_values(x_ptr, blocks, inside, norm_ptr)
    hs, rho = _block_hessian(x_ptr, blocks, inside, h_ptr, rho_ptr, per_row, HESSIAN)
    first = tl.load(range_ptr + blocks * 2, mask=inside, other=1 << 20)
    end = tl.load(range_ptr + blocks * 2 + 1, mask=inside, other=0)
    k_begin = tl.min(first, 0)
    k_end = tl.max(end, 0)
    best, second, best_bound, second_bound, best_k = _scan(
        xs, hs, rho, scale_ptr, recip_ptr, k_begin, k_end, TILE, HESSIAN
    )
    near = (second - best) <= TOL * (best_bound + second_bound) + 1e-27
    out_of_range = (amax > LIMIT) | (best != best)
    flag = tl.where(out_of_range, 2, tl.where(near & (amax > 0) & (rho > 0), 1, 0))
    tl.store(best_ptr + blocks, best_k, mask=inside)
    tl.store(flag_ptr + blocks, flag.to(tl.int8), mask=inside)
    repair = inside & (flag != 0)
    slots = tl.atomic_add(count_ptr + tl.zeros_like(lanes), 1, mask=repair)
    tl.store(flagged_ptr + slots, blocks, mask=repair)
    tl.store(work_ptr + tl.program_id(0), tl.maximum(k_end - k_begin, 0))


@triton.jit
def _scan(
    xs,
    hs,
    rho,
    scale_ptr,
    recip_ptr,
    k_begin,
    k_end,
    TILE: tl.constexpr,
    HESSIAN: tl.constexpr,
):
    """Best and second-best loss (with their bounds) over candidates ``[k_begin, k_end)``.
    Each candidate's scale and reciprocal are loaded one iteration ahead: the loop is short,
    and waiting for those loads would stall every iteration."""
    best, second, best_bound, second_bound, best_k = _untracked(TILE)
    s = tl.load(scale_ptr + k_begin, mask=k_begin < k_end, other=1.0)
    r = tl.load(recip_ptr + k_begin, mask=k_begin < k_end, other=1.0)
    for k in range(k_begin, k_end):
        following = k + 1 < k_end
        s_next = tl.load(scale_ptr + k + 1, mask=following, other=1.0)
        r_next = tl.load(recip_ptr + k + 1, mask=following, other=1.0)
        loss, bound = _loss_and_bound(xs, hs, rho, s, r, HESSIAN)
        best, second, best_bound, second_bound, best_k = _track_best(
            loss, bound, k, best, second, best_bound, second_bound, best_k
        )
        s, r = s_next, r_next
    return best, second, best_bound, second_bound, best_k


@triton.jit(do_not_specialize=["per_row"])
def _best_repair_kernel(
    x_ptr,
    scale_ptr,
    scaled_ptr,
    recip_ptr,
    norm_ptr,
    packed_ptr,
    rho_ptr,
    h_ptr,
    per_row,
    range_ptr,
    loss_norm_ptr,
    best_ptr,
    flag_ptr,
    flagged_ptr,
    count_ptr,
    HESSIAN: tl.constexpr,
    TOL: tl.constexpr,
    TILE: tl.constexpr,
):
    """Float64 losses, as the torch path computes them, of the candidates in a flagged block's
    range that may still be the argmin (``loss - TOL * bound <= min(loss + TOL * bound)``, as in
    ``nvfp4_sweep``); the others keep their float32 losses, which cannot win. The float32
    losses are scored again here, as ``_best_kernel`` scored them: the scan stores none. Lanes
    take the listed flagged blocks, so that every lane of a working tile has one; the tiles
    past the list's end return at once."""
    lanes = tl.program_id(0) * TILE + tl.arange(0, TILE)
    count = tl.load(count_ptr)
    if tl.program_id(0) * TILE < count:
        flagged = lanes < count
        blocks = tl.load(flagged_ptr + lanes, mask=flagged, other=0)
        flag = tl.load(flag_ptr + blocks, mask=flagged, other=0)
        first = tl.load(range_ptr + blocks * 2, mask=flagged, other=0)
        end = tl.load(range_ptr + blocks * 2 + 1, mask=flagged, other=0)
        xs, signs, hrow = _flagged_values(x_ptr, blocks, flagged, h_ptr, per_row)
        xs32, _ = _block_values(x_ptr, blocks, flagged, norm_ptr)
        hs, rho = _block_hessian(x_ptr, blocks, flagged, packed_ptr, rho_ptr, per_row, HESSIAN)
        scored = (xs32, hs, rho, scaled_ptr, recip_ptr, tl.load(loss_norm_ptr))
        k_begin = tl.min(tl.where(flagged, first, 1 << 20), 0)
        k_end = tl.max(end, 0)
        ceiling = tl.full([TILE], float("inf"), tl.float64)
        for k in range(k_begin, k_end):
            kept = flagged & (k >= first) & (k < end)
            loss, bound = _rescored(k, scored, HESSIAN)
            ceiling = tl.where(kept, tl.minimum(ceiling, loss + TOL * bound), ceiling)
        best = tl.full([TILE], float("inf"), tl.float64)
        best_k = tl.zeros([TILE], tl.int32)
        for k in range(k_begin, k_end):
            kept = flagged & (k >= first) & (k < end)
            loss, bound = _rescored(k, scored, HESSIAN)
            needed = kept & ((loss - TOL * bound <= ceiling) | (flag == 2))
            if tl.max(needed.to(tl.int32), 0) != 0:
                exact = _exact_loss(xs, signs, tl.load(scale_ptr + k), hrow, needed, TILE, HESSIAN)
                loss = tl.where(needed, exact, loss)
            below = kept & (loss < best)
            best_k = tl.where(below, k, best_k)
            best = tl.where(below, loss, best)
        tl.store(best_ptr + blocks, best_k, mask=flagged)


@triton.jit
def _rescored(k, scored, HESSIAN: tl.constexpr):
    """Candidate ``k``'s float32 loss and bound, in float64 and the torch path's units."""
    xs, hs, rho, scaled_ptr, recip_ptr, loss_norm = scored
    loss, bound = _loss_and_bound(
        xs, hs, rho, tl.load(scaled_ptr + k), tl.load(recip_ptr + k), HESSIAN
    )
    return loss.to(tl.float64) * loss_norm, bound.to(tl.float64) * loss_norm


def nvfp4_best_scales(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    hessian: torch.Tensor | None = None,
    *,
    counts: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each block's first best candidate, as ``nvfp4_scale_sweep`` chooses it, without losses.

    ``blocks`` ``[G, 16]`` float32/bf16/fp16 on CUDA; ``scales`` ``[K]`` ascending float32
    effective scales; ``hessian`` ``[per_row, 16, 16]`` or None. Returns ``best`` ``[G]`` int64
    and, with ``counts`` (else empty: they cost a dozen small kernels), for benchmarks:
    ``scored`` (candidates scored per block, tile unions counted), ``needed`` (the mean of the
    blocks' own ranges), ``repaired`` (blocks redone in float64).
    """
    blocks = blocks.contiguous()
    ops = kernel_operands(scales, hessian, blocks.device, floors=True)
    tile = 32 * BEST_WARPS * (1 if ops.weighted else PLAIN_BLOCKS_PER_THREAD)
    ranges, keys = _candidate_ranges(blocks, ops, tile)
    choice = _best_in_ranges(blocks, ops, ranges, keys, tile)
    _repair_flagged(blocks, ops, ranges, choice)
    if not counts:
        return choice.best.long(), {}
    return choice.best.long(), _work_counts(choice, ranges, tile)


@dataclass(frozen=True)
class _Choice:
    """What the best kernel leaves for the repair: ``best`` and ``flags`` ``[G]``, the flagged
    blocks' indices ``flagged`` ``[G]`` and their ``count`` ``[1]``, and per tile the
    candidates it scored ``work`` ``[tiles]``."""

    best: torch.Tensor
    flags: torch.Tensor
    flagged: torch.Tensor
    count: torch.Tensor
    work: torch.Tensor


def _candidate_ranges(
    blocks: torch.Tensor, ops: Operands, tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's range of candidates that can still win (``[G, 2]`` int32) and its sort key
    (``[G]`` int32), from the lower bounds of ``nvfp4_ranges``."""
    num_blocks, num_cand = blocks.shape[0], ops.scales.shape[0]
    ranges = torch.empty(num_blocks, 2, dtype=torch.int32, device=blocks.device)
    keys = torch.empty(num_blocks, dtype=torch.int32, device=blocks.device)
    _range_kernel[(triton.cdiv(num_blocks, tile),)](
        blocks,
        num_blocks,
        ops.scaled,
        ops.recip,
        ops.norm,
        ops.packed,
        ops.rho,
        ops.schur,
        ops.per_row,
        ranges,
        keys,
        NUM_CAND=num_cand,
        STEPS=num_cand.bit_length(),
        HESSIAN=ops.weighted,
        TOL=ops.tolerance,
        LIMIT=RANGE_LIMIT,
        TILE=tile,
        num_warps=BEST_WARPS,
        enable_fp_fusion=False,
    )
    return ranges, keys


def _best_in_ranges(
    blocks: torch.Tensor, ops: Operands, ranges: torch.Tensor, keys: torch.Tensor, tile: int
) -> _Choice:
    """Score, per tile of blocks sorted by ``keys``, the union of their ``ranges``: tiles of
    blocks with the same range score little more than each block's own range."""
    num_blocks, device = blocks.shape[0], blocks.device
    grid = (triton.cdiv(num_blocks, tile),)
    choice = _Choice(
        best=torch.empty(num_blocks, dtype=torch.int32, device=device),
        flags=torch.empty(num_blocks, dtype=torch.int8, device=device),
        flagged=torch.empty(num_blocks, dtype=torch.int32, device=device),
        count=torch.zeros(1, dtype=torch.int32, device=device),
        work=torch.empty(grid[0], dtype=torch.int32, device=device),
    )
    order = keys.argsort().to(torch.int32)
    _best_kernel[grid](
        blocks,
        order,
        num_blocks,
        ops.scaled,
        ops.recip,
        ops.norm,
        ops.packed,
        ops.rho,
        ops.per_row,
        ranges,
        choice.best,
        choice.flags,
        choice.flagged,
        choice.count,
        choice.work,
        HESSIAN=ops.weighted,
        TOL=ops.tolerance,
        LIMIT=RANGE_LIMIT,
        TILE=tile,
        num_warps=BEST_WARPS,
        enable_fp_fusion=False,
    )
    return choice


def _repair_flagged(
    blocks: torch.Tensor, ops: Operands, ranges: torch.Tensor, choice: _Choice
) -> None:
    """Rescore the flagged blocks (near ties) in float64, in place of ``choice.best``."""
    _best_repair_kernel[(triton.cdiv(blocks.shape[0], 32),)](
        blocks,
        ops.scales,
        ops.scaled,
        ops.recip,
        ops.norm,
        ops.packed,
        ops.rho,
        ops.h64,
        ops.per_row,
        ranges,
        ops.loss_norm,
        choice.best,
        choice.flags,
        choice.flagged,
        choice.count,
        HESSIAN=ops.weighted,
        TOL=ops.tolerance,
        TILE=32,
        num_warps=1,
        enable_fp_fusion=False,
    )


def _work_counts(choice: _Choice, ranges: torch.Tensor, tile: int) -> dict[str, torch.Tensor]:
    """The benchmarks' counts: candidates scored per block, the mean range, blocks repaired."""
    num_blocks = ranges.shape[0]
    tiles = choice.work.shape[0]
    in_tile = (num_blocks - torch.arange(tiles, device=ranges.device) * tile).clamp(max=tile)
    return {
        "scored": (choice.work * in_tile).sum() / max(num_blocks, 1),
        "needed": (ranges[:, 1] - ranges[:, 0]).double().mean(),
        "repaired": choice.count[0],
    }

"""Fused NVFP4 block-scale sweep: each block of 16 read once, every candidate scored in registers.

One thread owns one block. For each candidate effective scale ``s`` (FP8 value x global scale,
float32) it computes the float32 arithmetic of ``NVFP4Format.fake_quant_blocks``: ``y = x / s``
correctly rounded (Markstein: ``r = 1/s`` rounded once per candidate, ``q0 = x r``,
``e = fma(-q0, s, x)``, ``y = fma(e, r, q0)``, exact for normal operands, which a power-of-two
normalisation guarantees), E2M1 rounding of ``|y|`` half to even (clamp to 6, then one
``fma(c, 2^22, v)`` with ``c = 1.5 * max(2^e(v), 1)`` rounds to the grid step, and the inverse
``fma`` is exact), ``xq = q * s`` rounded to float32, ``d = xq - |x|`` (exact while ``|y| <= 12``).

The loss ``sum d^2`` (or ``dᵀ H d`` with the signs folded into ``H``) is accumulated in float32,
so each loss is within a relative ``2^-18`` (plain; for ``H``: ``2^-18 |d|ᵀ|H||d|``) of the
float64 torch reference. Each thread also keeps the best and second-best candidate; a block
whose two best are closer than that bound (a near or exact tie, or a block out of float32
range) is flagged, and a second kernel recomputes in float64, exactly as the torch path does,
that block's candidates that may still be the argmin (those whose loss minus its bound is below
every loss plus its bound; the Hessian kernel writes the bounds to a float32 scratch), or all of
them for a block out of range. So the argmin always equals the torch path's (the first
candidate on ties).
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
    _e2m1_dequant,
    _exact_loss,
    _flagged_values,
    _loss_and_bound,
    _track_best,
    _untracked,
)
from qcal_export.calibrators.kernels.nvfp4_prep import (
    Operands,
    kernel_operands,
    normalised_candidates,
)

SCORE_WARPS = 4
PLAIN_BLOCKS_PER_THREAD = 2
"""Two blocks per thread share the per-candidate loads and loop (12.7 instead of 13.4 SASS
instructions per element and candidate); the Hessian kernel keeps one (202 registers)."""
REPAIR_WARPS = 1


@triton.jit(do_not_specialize=["num_blocks", "per_row"])
def _score_kernel(
    x_ptr,
    num_blocks,
    scale_ptr,
    recip_ptr,
    norm_ptr,
    loss_norm_ptr,
    h_ptr,
    rho_ptr,
    per_row,
    loss_ptr,
    bound_ptr,
    best_ptr,
    flag_ptr,
    NUM_CAND: tl.constexpr,
    HESSIAN: tl.constexpr,
    TOL: tl.constexpr,
    LIMIT: tl.constexpr,
    TILE: tl.constexpr,
):
    blocks = tl.program_id(0) * TILE + tl.arange(0, TILE)
    inside = blocks < num_blocks
    xs, amax = _block_values(x_ptr, blocks, inside, norm_ptr)
    hs, rho = _block_hessian(x_ptr, blocks, inside, h_ptr, rho_ptr, per_row, HESSIAN)
    loss_norm = tl.load(loss_norm_ptr)
    best, second, best_bound, second_bound, best_k = _untracked(TILE)
    for k in range(NUM_CAND):
        loss, bound = _loss_and_bound(
            xs, hs, rho, tl.load(scale_ptr + k), tl.load(recip_ptr + k), HESSIAN
        )
        if HESSIAN:
            tl.store(bound_ptr + k * num_blocks + blocks, bound, mask=inside)
        tl.store(loss_ptr + k * num_blocks + blocks, loss.to(tl.float64) * loss_norm, mask=inside)
        best, second, best_bound, second_bound, best_k = _track_best(
            loss, bound, k, best, second, best_bound, second_bound, best_k
        )
    near = (second - best) <= TOL * (best_bound + second_bound) + 1e-27
    out_of_range = (amax > LIMIT) | (best != best)
    flag = tl.where(out_of_range, 2, tl.where(near & (amax > 0) & (rho > 0), 1, 0))
    tl.store(best_ptr + blocks, best_k, mask=inside)
    tl.store(flag_ptr + blocks, flag.to(tl.int8), mask=inside)


@triton.jit(do_not_specialize=["num_blocks", "per_row"])
def _repair_kernel(
    x_ptr,
    num_blocks,
    scale_ptr,
    h_ptr,
    per_row,
    loss_ptr,
    bound_ptr,
    loss_norm_ptr,
    best_ptr,
    flag_ptr,
    NUM_CAND: tl.constexpr,
    HESSIAN: tl.constexpr,
    TOL: tl.constexpr,
    TILE: tl.constexpr,
):
    """Float64 losses, as the torch path computes them, of the flagged blocks' candidates that
    may still be the argmin: ``loss - TOL * bound <= min(loss + TOL * bound)``."""
    blocks = tl.program_id(0) * TILE + tl.arange(0, TILE)
    inside = blocks < num_blocks
    flag = tl.load(flag_ptr + blocks, mask=inside, other=0)
    flagged = flag != 0
    if tl.max(flagged.to(tl.int32), 0) != 0:
        loss_norm = tl.load(loss_norm_ptr)
        ceiling = tl.full([TILE], float("inf"), tl.float64)
        for k in range(NUM_CAND):
            loss = tl.load(loss_ptr + k * num_blocks + blocks, mask=flagged, other=0.0)
            if HESSIAN:
                bound = tl.load(bound_ptr + k * num_blocks + blocks, mask=flagged, other=0.0)
                bound = bound.to(tl.float64) * loss_norm
            else:
                bound = loss
            ceiling = tl.minimum(ceiling, loss + TOL * bound)
        xs, signs, hrow = _flagged_values(x_ptr, blocks, flagged, h_ptr, per_row)
        best = tl.full([TILE], float("inf"), tl.float64)
        best_k = tl.zeros([TILE], tl.int32)
        for k in range(NUM_CAND):
            loss = tl.load(loss_ptr + k * num_blocks + blocks, mask=flagged, other=0.0)
            if HESSIAN:
                bound = tl.load(bound_ptr + k * num_blocks + blocks, mask=flagged, other=0.0)
                bound = bound.to(tl.float64) * loss_norm
            else:
                bound = loss
            needed = flagged & ((loss - TOL * bound <= ceiling) | (flag == 2))
            if tl.max(needed.to(tl.int32), 0) != 0:
                exact = _exact_loss(xs, signs, tl.load(scale_ptr + k), hrow, needed, TILE, HESSIAN)
                tl.store(loss_ptr + k * num_blocks + blocks, exact, mask=needed)
                loss = tl.where(needed, exact, loss)
            below = loss < best
            best_k = tl.where(below, k, best_k)
            best = tl.where(below, loss, best)
        tl.store(best_ptr + blocks, best_k, mask=flagged)


@triton.jit
def _dequant_kernel(x_ptr, n, scale_ptr, recip_ptr, norm_ptr, out_ptr, TILE: tl.constexpr):
    """``[K, n]``: each value's normalised Q -> DQ under candidate ``program_id(1)``."""
    offsets = tl.program_id(0) * TILE + tl.arange(0, TILE)
    inside = offsets < n
    k = tl.program_id(1)
    s = tl.load(scale_ptr + k)
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0) * tl.load(norm_ptr)
    xq = _e2m1_dequant(tl.abs(x), s, -s, tl.load(recip_ptr + k), True)
    tl.store(out_ptr + k.to(tl.int64) * n + offsets, tl.where(x < 0, -xq, xq), mask=inside)


def fake_quant_like_sweep(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The sweep's Q -> DQ of float32 ``x`` ``[n]`` under each of ``scales`` ``[K]``: ``[K, n]``.

    For tests: must equal ``NVFP4.fake_quant_blocks`` bit for bit (scaled back by ``2^-k``).
    """
    scales = scales.to(device=x.device, dtype=torch.float32).contiguous()
    scaled, recip, norm, _ = normalised_candidates(scales)
    x = x.to(torch.float32).contiguous()
    out = torch.empty(scales.shape[0], x.numel(), dtype=torch.float32, device=x.device)
    _dequant_kernel[(triton.cdiv(x.numel(), 1024), scales.shape[0])](
        x, x.numel(), scaled, recip, norm, out, TILE=1024, enable_fp_fusion=False
    )
    return out / norm


def nvfp4_scale_sweep(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    hessian: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    repair: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of every candidate scale for every block, and each block's first best candidate.

    ``blocks`` ``[G, 16]`` float32/bf16/fp16 on CUDA; ``scales`` ``[K]`` float32 effective
    scales (FP8 value x global scale, ascending); ``hessian`` ``[per_row, 16, 16]`` (block ``g``
    uses ``hessian[g % per_row]``) or None for squared error. Returns ``losses`` ``[K, G]``
    float64 (written into ``out`` when given), ``best`` ``[G]`` int64 and a 0-dim count of the
    blocks recomputed in float64 (``repair=False`` skips that pass: for benchmarks only).
    """
    blocks = blocks.contiguous()
    num_blocks, num_cand = blocks.shape[0], scales.shape[0]
    device = blocks.device
    sweep = _Sweep(
        losses=out
        if out is not None
        else torch.empty(num_cand, num_blocks, dtype=torch.float64, device=device),
        bounds=torch.empty(
            (num_cand, num_blocks) if hessian is not None else (1,),
            dtype=torch.float32,
            device=device,
        ),
        best=torch.empty(num_blocks, dtype=torch.int32, device=device),
        flags=torch.empty(num_blocks, dtype=torch.int8, device=device),
    )
    ops = kernel_operands(scales, hessian, device, floors=False)
    _score(blocks, ops, sweep)
    if repair:
        _repair(blocks, ops, sweep)
    return sweep.losses, sweep.best.long(), (sweep.flags != 0).sum()


@dataclass(frozen=True)
class _Sweep:
    """The sweep's outputs: ``losses`` ``[K, G]`` float64, the float32 error ``bounds`` of the
    Hessian losses (``[K, G]``; ``[1]``, unused, for squared error), ``best`` ``[G]`` int32 and
    the ``flags`` ``[G]`` int8 of the blocks the repair recomputes in float64."""

    losses: torch.Tensor
    bounds: torch.Tensor
    best: torch.Tensor
    flags: torch.Tensor


def _score(blocks: torch.Tensor, ops: Operands, sweep: _Sweep) -> None:
    """Every candidate's loss for every block in float32, the first best, near ties flagged."""
    num_blocks = blocks.shape[0]
    tile = 32 * SCORE_WARPS * (1 if ops.weighted else PLAIN_BLOCKS_PER_THREAD)
    _score_kernel[(triton.cdiv(num_blocks, tile),)](
        blocks,
        num_blocks,
        ops.scaled,
        ops.recip,
        ops.norm,
        ops.loss_norm,
        ops.packed,
        ops.rho,
        ops.per_row,
        sweep.losses,
        sweep.bounds,
        sweep.best,
        sweep.flags,
        NUM_CAND=ops.scales.shape[0],
        HESSIAN=ops.weighted,
        TOL=ops.tolerance,
        LIMIT=RANGE_LIMIT,
        TILE=tile,
        num_warps=SCORE_WARPS,
        enable_fp_fusion=False,
    )


def _repair(blocks: torch.Tensor, ops: Operands, sweep: _Sweep) -> None:
    """The flagged blocks' losses and choice again in float64."""
    num_blocks = blocks.shape[0]
    _repair_kernel[(triton.cdiv(num_blocks, 32 * REPAIR_WARPS),)](
        blocks,
        num_blocks,
        ops.scales,
        ops.h64,
        ops.per_row,
        sweep.losses,
        sweep.bounds,
        ops.loss_norm,
        sweep.best,
        sweep.flags,
        NUM_CAND=ops.scales.shape[0],
        HESSIAN=ops.weighted,
        TOL=ops.tolerance,
        TILE=32 * REPAIR_WARPS,
        num_warps=REPAIR_WARPS,
        enable_fp_fusion=False,
    )

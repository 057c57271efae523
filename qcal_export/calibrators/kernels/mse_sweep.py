"""Fused MSE candidate sweep: read each group's values once, score every candidate in registers.

For one tile of a group's values (float32, bf16 or fp16, upcast in registers) the kernel loops
over the candidates and computes the exact QuantizeLinear -> DequantizeLinear float32 arithmetic
of ``formats.py`` (correctly rounded ``x / scale``, round half to even, saturation; fp8 through
the hardware's E4M3 conversion), then ``(xq - x) ** 2`` in float64 (the float32 ``xq`` and ``x``
differ exactly there, as in the torch path) summed over the tile. Tile sums are added per
program and written as per-split partials, which torch sums: the result is deterministic and
differs from the torch reference only in the order of float64 additions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from qcal_export.formats import FP8E4M3Format, IntFormat

MAX_BLOCK = 4096
"""Values of one group held in registers at a time (32 per thread with 4 warps)."""
PROGRAMS_PER_SM = 4


@triton.jit
def _sweep_kernel(
    x_ptr,
    row_stride,
    n,
    cols_per_split,
    scale_ptr,
    zero_point_ptr,
    partial_ptr,
    num_groups,
    num_cand,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    FP8: tl.constexpr,
    ASYMMETRIC: tl.constexpr,
    BLOCK: tl.constexpr,
    CAND_PAD: tl.constexpr,
):
    group = tl.program_id(0)
    split = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    cands = tl.arange(0, CAND_PAD)
    acc = tl.zeros([CAND_PAD], dtype=tl.float64)
    row = x_ptr + group.to(tl.int64) * row_stride
    begin = split.to(tl.int64) * cols_per_split
    end = tl.minimum(begin + cols_per_split, n)
    for start in range(begin, end, BLOCK):
        offsets = start + cols
        # Masked lanes read 0, which every candidate reproduces exactly: they add nothing.
        x = tl.load(row + offsets, mask=offsets < end, other=0.0).to(tl.float32)
        for k in range(num_cand):
            scale = tl.load(scale_ptr + k * num_groups + group)
            y = tl.math.div_rn(x, scale)
            if FP8:
                y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
                y = y.to(tl.float8e4nv).to(tl.float32)
            else:
                y = libdevice.rint(y)
                if ASYMMETRIC:
                    zero_point = tl.load(zero_point_ptr + k * num_groups + group)
                    y = tl.minimum(tl.maximum(y, QMIN - zero_point), QMAX - zero_point)
                else:
                    y = tl.minimum(tl.maximum(y, QMIN), QMAX)
            diff = (y * scale).to(tl.float64) - x.to(tl.float64)
            tile = tl.sum(diff * diff, axis=0)
            acc += tl.where(cands == k, tile, 0.0)
    out = partial_ptr + (split.to(tl.int64) * num_groups + group) * num_cand
    tl.store(out + cands, acc, mask=cands < num_cand)


def mse_sweep_(
    losses: torch.Tensor,
    groups: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    fmt: IntFormat | FP8E4M3Format,
) -> torch.Tensor:
    """Add each candidate's summed squared QDQ error per group to ``losses``, in place.

    ``losses`` ``[G, K]`` float64; ``groups`` ``[G, n]`` float32/bf16/fp16 on CUDA;
    ``scale`` and ``zero_point`` ``[K, G]`` float32 (``zero_point`` unused when symmetric).
    """
    if groups.stride(1) != 1:
        groups = groups.contiguous()
    num_groups, n = groups.shape
    num_cand = scale.shape[0]
    block = min(MAX_BLOCK, max(128, triton.next_power_of_2(n)))
    programs = (
        PROGRAMS_PER_SM * torch.cuda.get_device_properties(groups.device).multi_processor_count
    )
    splits = min(triton.cdiv(n, block), max(1, triton.cdiv(programs, num_groups)))
    cols_per_split = triton.cdiv(triton.cdiv(n, splits), block) * block
    splits = triton.cdiv(n, cols_per_split)
    partial = torch.empty(splits, num_groups, num_cand, dtype=torch.float64, device=groups.device)
    fp8 = isinstance(fmt, FP8E4M3Format)
    _sweep_kernel[(num_groups, splits)](
        groups,
        groups.stride(0),
        n,
        cols_per_split,
        scale.contiguous(),
        zero_point.contiguous(),
        partial,
        num_groups,
        num_cand,
        QMIN=-fmt.qmax if fp8 else fmt.qmin,
        QMAX=fmt.qmax,
        FP8=fp8,
        ASYMMETRIC=not fmt.symmetric,
        BLOCK=block,
        CAND_PAD=triton.next_power_of_2(num_cand),
        num_warps=4,
        # ``y * scale`` must round to float32 before the difference, as torch does.
        enable_fp_fusion=False,
    )
    return losses.add_(partial.sum(0))

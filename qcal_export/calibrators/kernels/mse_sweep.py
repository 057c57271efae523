"""Fused MSE candidate sweep: read each group's values once, score every candidate in registers.

``groups`` is any 2-D strided view ``[G, n]`` (rows of a row-major tensor, columns of one, or
blocks) in float32, bf16 or fp16, upcast in registers. Rows and blocks are read in place. Groups
that lie next to each other in memory (the columns of a row-major tensor, per-axis(-1)) are
copied in slabs of about ``SLAB_BYTES`` into row-major ``[G, slab]`` first (``_rows``, a
tiled transpose): reading a column at a stride costs more than the copy, which the kernel then
reads back mostly from L2 (the timings of each layout are in
``benchmarks/results/design_notes.md``). A program holds
a tile of ``TILE_G`` groups x ``TILE_N`` values and, per candidate, computes the float32
arithmetic of ``formats.py``'s QuantizeLinear -> DequantizeLinear (a non-finite value is
read as 0, which adds no error: ``collect`` counts them without waiting for the device):

- int formats: with ``r = 1 / scale`` (correctly rounded, by torch, once per candidate and
  group), ``t = fma(x, r, 1.5 * 2**23)`` rounds the exact product ``x r`` half to even, and
  saturating ``t`` to ``[qmin - zero_point, qmax - zero_point] + 1.5 * 2**23`` saturates
  the integer (a product past ``2**22`` is past saturation too, inf included). The integer is
  that of ``x / scale`` except where ``x / scale`` lies within 2^-24 relative of a midpoint
  between two integers; there the value's error moves by about that much. Symmetric formats
  take ``|x|`` against the saturation level of ``x``'s sign (``-qmin`` or ``qmax``), so one
  clamp does, and ``|x - xq| = ||x| - |xq||`` since QDQ is odd for them: 7.5 SASS
  instructions per value and candidate;
- fp8: ``x / scale`` correctly rounded without a division: ``q = x * r``, then one Newton step
  on the exact residual ``fma(-q, scale, x)`` (Markstein: with ``r`` correctly rounded this
  gives the correctly rounded quotient), ``x`` clamped first to a bound past every candidate's
  saturation so that ``x * r`` never overflows; then saturation and the hardware's E4M3
  conversion;
- ``xq = q * scale`` rounded to float32, then ``(xq - x) ** 2``.

The squares are summed in float32 over each tile (at most 4096 per group); each tile stores its
sums in a slot of its own and torch adds the slots in float64. Deterministic; the losses agree
with the float64 reference of this arithmetic to about 1e-7 relative (2e-6 at worst), so the
chosen candidate is the torch path's except where two candidates' losses are equal to float32
accuracy, which no float32 sum can order (the torch path sums in float64 and remains the
reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from qcal_export.spec.formats import FP8E4M3Format, IntFormat

TILE = 4096
"""Values held in registers per program: 32 per thread with ``WARPS`` 4."""
SLAB_BYTES = 1 << 26
"""Column groups are copied to row-major slabs of this size (64 MiB), or of ``TILE`` values
per group where that is more: the sweep then runs on whole tiles."""
WARPS = 4
PROGRAMS_PER_SM = 4
INFINITY = tl.constexpr(float("inf"))
ROUNDING = tl.constexpr(12582912.0)
"""``1.5 * 2**23``: adding it rounds any float32 below ``2**22`` in magnitude to an integer."""


@triton.jit
def _quotient(x, scale, inverse):
    """``x / scale`` correctly rounded, from ``inverse = 1 / scale`` correctly rounded."""
    q = x * inverse
    return tl.fma(tl.fma(q, -scale, x), inverse, q)


@triton.jit
def _fp8_dequant(x, scale, inverse, top):
    """E4M3 QuantizeLinear -> DequantizeLinear (saturating at ``top``) of ``x`` clamped past
    saturation (float32)."""
    y = tl.minimum(tl.maximum(_quotient(x, scale, inverse), -top), top)
    return libdevice.mul_rn(y.to(tl.float8e4nv).to(tl.float32), scale)  # never contracted


@triton.jit
def _int_dequant(x, scale, inverse, lo, hi):
    """Int QuantizeLinear -> DequantizeLinear: ``fma(x, inverse, 1.5 * 2**23)`` rounds the exact
    ``x * inverse`` half to even, saturated to ``[lo, hi]`` plus the same offset."""
    t = tl.minimum(tl.maximum(tl.fma(x, inverse, ROUNDING), ROUNDING + lo), ROUNDING + hi)
    return libdevice.mul_rn(t - ROUNDING, scale)


@triton.jit
def _symmetric_dequant(ax, scale, inverse, top):
    """``|QDQ(x)|`` of a symmetric int format from ``ax = |x|`` and ``top``, the saturation
    level of ``x``'s sign plus ``1.5 * 2**23``: one clamp."""
    t = tl.minimum(tl.fma(ax, inverse, ROUNDING), top)
    return libdevice.mul_rn(t - ROUNDING, scale)


@triton.jit
def _sweep_kernel(
    x_ptr,
    group_stride,
    elem_stride,
    num_groups,
    n,
    n_per_split,
    scale_ptr,
    inverse_ptr,
    zero_point_ptr,
    bound_ptr,
    partial_ptr,
    num_cand,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    FP8: tl.constexpr,
    SIGN_FOLD: tl.constexpr,
    TILE_G: tl.constexpr,
    TILE_N: tl.constexpr,
):
    split = tl.program_id(1)
    g = tl.program_id(0) * TILE_G + tl.arange(0, TILE_G)
    g_mask = g < num_groups
    begin = split.to(tl.int64) * n_per_split
    end = tl.minimum(begin + n_per_split, n)
    g_off = g[:, None]
    g_off_mask = g_off < num_groups
    if FP8:
        bound = tl.load(bound_ptr + g_off, mask=g_off_mask, other=0.0)
    # Each tile stores its sums in its own slot: no read-modify-write waits on memory.
    tiles_per_split = n_per_split // TILE_N
    out = partial_ptr + split.to(tl.int64) * tiles_per_split * num_cand * num_groups + g
    for start in range(0, n_per_split, TILE_N):
        i = begin + start + tl.arange(0, TILE_N)
        mask = (i[None, :] < end) & g_off_mask
        ptrs = x_ptr + g_off.to(tl.int64) * group_stride + i[None, :].to(tl.int64) * elem_stride
        # Masked lanes and non-finite values read 0, which every candidate reproduces
        # exactly: they add nothing.
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(tl.abs(x) < INFINITY, x, 0.0)
        if SIGN_FOLD:  # |x| against its sign's saturation level: one clamp per candidate
            ax = tl.abs(x)
            top = tl.where(x < 0, ROUNDING - QMIN, ROUNDING + QMAX)
        if FP8:
            x_safe = tl.minimum(tl.maximum(x, -bound), bound)
        for k in range(num_cand):
            offset = k * num_groups + g_off
            scale = tl.load(scale_ptr + offset, mask=g_off_mask, other=1.0)
            inverse = tl.load(inverse_ptr + offset, mask=g_off_mask, other=1.0)
            if FP8:
                diff = _fp8_dequant(x_safe, scale, inverse, QMAX) - x
            elif SIGN_FOLD:
                diff = _symmetric_dequant(ax, scale, inverse, top) - ax
            else:
                zero_point = tl.load(zero_point_ptr + offset, mask=g_off_mask, other=0.0)
                diff = _int_dequant(x, scale, inverse, QMIN - zero_point, QMAX - zero_point) - x
            tl.store(out + k * num_groups, tl.sum(diff * diff, axis=1), mask=g_mask)
        out += num_cand * num_groups


def mse_sweep_(
    losses: torch.Tensor,
    groups: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    fmt: IntFormat | FP8E4M3Format,
) -> torch.Tensor:
    """Add each candidate's summed squared QDQ error per group to ``losses``, in place.

    ``losses`` ``[G, K]`` float64; ``groups`` ``[G, n]`` float32/bf16/fp16 on CUDA, any strides;
    ``scale`` and ``zero_point`` ``[K, G]`` float32 (``zero_point`` unused when symmetric).
    """
    fp8 = not fmt.integer
    qmin, qmax = (-fmt.qmax, fmt.qmax) if fp8 else (fmt.qmin, fmt.qmax)
    scale = scale.contiguous()
    # Past (qmax - qmin + 2) times a group's largest scale every fp8 candidate saturates; the
    # int formats round the product, which saturates past 2**22, so they need no bound.
    bound = scale.amax(0).mul_(qmax - qmin + 2).contiguous() if fp8 else scale[0]
    inverse = torch.ones_like(scale).div_(scale)  # IEEE division: correctly rounded
    args = (scale, inverse, zero_point.contiguous(), bound)
    constants = {"QMIN": qmin, "QMAX": qmax, "FP8": fp8, "SIGN_FOLD": fmt.symmetric and not fp8}
    num_groups, n = groups.shape
    if groups.stride(0) != 1 or num_groups == 1:
        return _sweep(losses, groups, args, constants)
    step = max(TILE, SLAB_BYTES // (num_groups * groups.element_size()))
    for begin in range(0, n, step):
        _sweep(losses, _rows(groups[:, begin : begin + step]), args, constants)
    return losses


@triton.jit
def _transpose_kernel(src, dst, num_groups, n, elem_stride, BG: tl.constexpr, BN: tl.constexpr):
    """``dst[g, i] = src[g + i * elem_stride]``: tiles read along the groups, written along i
    (a 1-D grid, so that neither count of tiles meets a grid axis's limit)."""
    tiles_n = tl.cdiv(n, BN)
    g = (tl.program_id(0) // tiles_n) * BG + tl.arange(0, BG)
    i = (tl.program_id(0) % tiles_n) * BN + tl.arange(0, BN)
    tile = tl.load(
        src + i[:, None].to(tl.int64) * elem_stride + g[None, :],
        mask=(i[:, None] < n) & (g[None, :] < num_groups),
    )
    rows = dst + g[:, None].to(tl.int64) * n + i[None, :]
    tl.store(rows, tl.trans(tile), mask=(g[:, None] < num_groups) & (i[None, :] < n))


def _rows(columns: torch.Tensor) -> torch.Tensor:
    """``columns`` ``[G, n]`` (``stride(0) == 1``: groups adjacent in memory) as row-major."""
    num_groups, n = columns.shape
    rows = torch.empty(num_groups, n, dtype=columns.dtype, device=columns.device)
    grid = (triton.cdiv(num_groups, 64) * triton.cdiv(n, 64),)
    _transpose_kernel[grid](columns, rows, num_groups, n, columns.stride(1), BG=64, BN=64)
    return rows


def _sweep(
    losses: torch.Tensor, groups: torch.Tensor, args: tuple, constants: dict
) -> torch.Tensor:
    """One launch over ``groups``, each row read along its stride."""
    num_groups, n = groups.shape
    num_cand = args[0].shape[0]
    tile_n = min(TILE, max(16, triton.next_power_of_2(n)))
    tile_g = TILE // tile_n
    group_tiles = triton.cdiv(num_groups, tile_g)
    sms = (
        torch.cuda.get_device_properties(groups.device).multi_processor_count
        if groups.is_cuda
        else 1  # the Triton interpreter (TRITON_INTERPRET=1) runs on CPU tensors
    )
    splits = min(triton.cdiv(n, tile_n), max(1, triton.cdiv(PROGRAMS_PER_SM * sms, group_tiles)))
    n_per_split = triton.cdiv(triton.cdiv(n, splits), tile_n) * tile_n
    splits = triton.cdiv(n, n_per_split)
    # A slot per tile, float32 (cdiv(n, TILE_N) x candidates x groups: a few % of the input),
    # every slot written (a tile past n stores zeros), added in float64 by torch.
    slots = splits * (n_per_split // tile_n)
    partial = torch.empty(slots, num_cand, num_groups, dtype=torch.float32, device=groups.device)
    _sweep_kernel[(group_tiles, splits)](
        groups,
        groups.stride(0),
        groups.stride(1),
        num_groups,
        n,
        n_per_split,
        *args,
        partial,
        num_cand,
        **constants,
        TILE_G=tile_g,
        TILE_N=tile_n,
        num_warps=WARPS,
    )
    return losses.add_(partial.sum(0, dtype=torch.float64).T)

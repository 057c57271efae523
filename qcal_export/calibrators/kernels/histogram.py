"""Fused histogram update: read each value once, bin it exactly, add it to its group's counts.

The bin of ``x`` in a group of width ``2**e`` is ``floor(x * 2**-e)`` (signed, shifted by
``bins``), as in the torch path of ``calibrators/histogram.py``. Float32 gives it exactly: the
product by a power of two is exact unless it underflows, and then ``|x * 2**-e| < 1``, so only
the sign decides (bin -1 or 0); the kernel takes that sign from the input's bits, which no
flush-to-zero can lose. ``2**-e`` is applied as two normal float32 factors, so that ``e = 127``
(two or three bins and a huge range) needs no subnormal scale. Non-finite values are left out.

Counts go straight to the int64 histogram with relaxed atomics, except when few groups are each
split over several programs (per-tensor): then each split counts into its own int32 row and
torch sums the rows into the int64 histogram, so that a hot bin is not one address for the
whole GPU, and no int32 count outlives a call (none can overflow across batches). The bin of 0
(values in ``[0, 2**e)``, where zeros and padding land) is summed per tile and added once.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

TILE = 2048
"""Values per program and loop step."""
PROGRAMS_PER_SM = 4
MAX_SPLIT_COLUMNS = 1 << 30
"""Columns of one split at most: its int32 counts cannot overflow."""
PRIVATE_ELEMENTS = 1 << 22
"""Int32 counts of all splits' private rows at most (16 MiB, L2-resident); beyond, splits add
to the int64 histogram directly (many groups: their rows are many addresses already)."""
_BITS_OF = {  # the integer of the input's width, and its magnitude bits
    torch.float32: (tl.int32, 0x7FFFFFFF),
    torch.bfloat16: (tl.int16, 0x7FFF),
    torch.float16: (tl.int16, 0x7FFF),
}


# A known unit stride_n would vectorize the loads, and the atomics would then need their 64-bit
# addresses moved to another layout through shared memory; plain coalesced loads avoid that.
@triton.jit(do_not_specialize=["stride_n"])
def _histogram_kernel(
    x_ptr,
    stride_g,
    stride_n,
    num_groups,
    n,
    cols_per_split,
    exponent_ptr,
    counts_ptr,
    split_stride,
    bins,
    INT: tl.constexpr,
    MAGNITUDE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    split = tl.program_id(1)
    groups = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    in_group = groups < num_groups
    exponent = tl.load(exponent_ptr + groups, mask=in_group, other=0).to(tl.int32)
    high = tl.minimum(exponent, 126)
    # 2**-high and 2**-(exponent - high) from their float32 bits: both normal, exact.
    scale_high = ((127 - high) << 23).to(tl.float32, bitcast=True)[:, None]
    scale_low = ((127 - exponent + high) << 23).to(tl.float32, bitcast=True)[:, None]
    rows = x_ptr + groups.to(tl.int64)[:, None] * stride_g
    zero_bin = counts_ptr + split * split_stride + groups.to(tl.int64) * (2 * bins) + bins
    begin = split.to(tl.int64) * cols_per_split
    end = tl.minimum(begin + cols_per_split, n)
    central = tl.zeros([BLOCK_G], dtype=tl.int32)
    for start in range(begin, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        inside = in_group[:, None] & (cols < end)[None, :]
        raw = tl.load(rows + cols[None, :] * stride_n, mask=inside, other=0.0)
        x = raw.to(tl.float32)
        signed = tl.floor((x * scale_high) * scale_low).to(tl.int32)
        bits = raw.to(INT, bitcast=True)
        negative = (bits < 0) & ((bits & MAGNITUDE) != 0)  # -0.0 is bin 0
        signed = tl.where(negative, tl.minimum(signed, -1), signed)
        counted = inside & ((x - x) == 0.0)  # NaN and +-Inf give NaN
        is_zero_bin = signed == 0
        central += tl.sum((counted & is_zero_bin).to(tl.int32), axis=1)
        target = zero_bin[:, None] + signed
        tl.atomic_add(target, 1, mask=counted & ~is_zero_bin, sem="relaxed")
    tl.atomic_add(zero_bin, central, mask=in_group & (central > 0), sem="relaxed")


def _tile(groups: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``groups`` in a layout the kernel reads coalesced, and its (BLOCK_G, BLOCK_N) tile.

    Rows of contiguous values are read along the row; a transposed view (``PerAxis(-1)`` of a
    row-major tensor: stride 1 across groups) is read across groups; anything else is copied.
    """
    num_groups, n = groups.shape
    if groups.stride(1) == 1 or n == 1:
        block_n = min(TILE, max(16, triton.next_power_of_2(n)))
        block_g = min(TILE // block_n, triton.next_power_of_2(num_groups))
        return groups, block_g, block_n
    if groups.stride(0) != 1:
        return _tile(groups.contiguous())
    block_g = min(64, max(16, triton.next_power_of_2(num_groups)))
    return groups, block_g, TILE // block_g


def _program_count(device: torch.device) -> int:
    if device.type != "cuda":
        return PROGRAMS_PER_SM * 4  # the Triton interpreter (tests on CPU)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return PROGRAMS_PER_SM * _multiprocessors(index)


@functools.cache
def _multiprocessors(index: int) -> int:
    """The GPU's SM count, read once (each read of the properties costs the host)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def _column_splits(
    n: int, block_n: int, group_programs: int, device: torch.device
) -> tuple[int, int]:
    """How many programs share a group's ``n`` columns, and how many columns each takes (a
    multiple of ``block_n``): enough programs to fill the device, none past
    ``MAX_SPLIT_COLUMNS``."""
    splits = triton.cdiv(_program_count(device), group_programs)
    splits = max(min(splits, triton.cdiv(n, block_n)), triton.cdiv(n, MAX_SPLIT_COLUMNS))
    cols_per_split = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
    return triton.cdiv(n, cols_per_split), cols_per_split


def histogram_add_(
    hist: torch.Tensor,
    groups: torch.Tensor,
    exponent: torch.Tensor,
    *,
    private: bool | None = None,
) -> torch.Tensor:
    """Add every finite value of ``groups`` to its group's bin in ``hist``, in place.

    ``hist`` ``[G, 2 * bins]`` int64, contiguous (signed bin ``floor(x * 2**-e)`` at
    ``index - bins``); ``groups`` ``[G, n]`` float32, bfloat16 or float16, every finite
    ``|x| < bins * 2**e``; ``exponent`` ``[G]`` int64, ``-126 <= e <= 127``. ``private`` forces
    or forbids int32 rows per split (default: when a group is split and the rows are small).
    """
    num_groups, n = groups.shape
    bins = hist.shape[1] // 2
    if groups.numel() == 0:
        return hist
    groups, block_g, block_n = _tile(groups)
    integer, magnitude = _BITS_OF[groups.dtype]
    group_programs = triton.cdiv(num_groups, block_g)
    splits, cols_per_split = _column_splits(n, block_n, group_programs, groups.device)
    if private is None:
        private = splits > 1 and splits * hist.numel() <= PRIVATE_ELEMENTS
    if private:
        counts = torch.zeros(splits, *hist.shape, dtype=torch.int32, device=hist.device)
    else:
        counts = hist
    _histogram_kernel[(group_programs, splits)](
        groups,
        groups.stride(0),
        groups.stride(1),
        num_groups,
        n,
        cols_per_split,
        exponent.to(device=groups.device, dtype=torch.int64).contiguous(),
        counts,
        counts.stride(0) if private else 0,
        bins,
        INT=integer,
        MAGNITUDE=magnitude,
        BLOCK_G=block_g,
        BLOCK_N=block_n,
        num_warps=4,
    )
    if private:
        hist += counts.sum(0)
    return hist

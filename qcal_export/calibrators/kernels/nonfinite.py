"""Non-finite values of a CUDA tensor, counted (and replaced) in one pass, with no host sync.

``collect`` under ``nonfinite="skip"`` must count NaN and +-inf and keep them out of the
statistics. On the host that costs nothing; on a GPU, branching on the count would wait for the
device on every collect, and the GPU would then idle while the host launches the next work
(``benchmarks/results/design_notes.md`` has the cost measured). Here each program counts
its block's non-finite values into a slot of its own (torch adds the slots on the device) and,
when asked, writes the block with ``fill`` in their place. Where the calibrator's own kernel
reads non-finite values as no data, only the count is needed: one read of the tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
INFINITY = tl.constexpr(float("inf"))


@triton.jit
def _nonfinite_kernel(
    x_ptr, out_ptr, count_ptr, numel, fill, REPLACE: tl.constexpr, BLOCK: tl.constexpr
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    finite = tl.abs(x.to(tl.float32)) < INFINITY  # false for NaN too
    tl.store(count_ptr + tl.program_id(0), tl.sum((~finite).to(tl.int32), 0))
    if REPLACE:
        tl.store(out_ptr + offsets, tl.where(finite, x, fill), mask=inside)


def nonfinite(x: torch.Tensor, fill: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, count)``: ``x`` as it is when ``fill`` is None, else a copy with ``fill`` in place
    of each non-finite value; ``count`` a 0-d int64 tensor on ``x``'s device. ``x`` is a
    float32, bf16 or fp16 CUDA tensor; a non-contiguous one is read through a contiguous copy."""
    flat = x.contiguous().view(-1)
    programs = max(1, triton.cdiv(flat.numel(), BLOCK))
    counts = torch.empty(programs, dtype=torch.int32, device=x.device)
    out = flat if fill is None else torch.empty_like(flat)
    _nonfinite_kernel[(programs,)](
        flat, out, counts, flat.numel(), fill or 0.0, REPLACE=fill is not None, BLOCK=BLOCK
    )
    return (x if fill is None else out.view(x.shape)), counts.sum()

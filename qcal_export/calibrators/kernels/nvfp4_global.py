"""Fused NVFP4 global-amax sweep (``mse`` with ``nvfp4``): every candidate scored in registers.

The candidates are global scales ``g`` (one per candidate global amax); each block of 16 takes
its FP8 scale from its own amax, as the exported graph computes it. One thread owns a block
(two per thread with ``WARPS`` 4) and, per candidate, computes the float32 arithmetic of
``NVFP4Format.fake_quant_into``:

- the block scale ``fp8(clamp((amax / 6) / g, 2^-9, 448))``: ``amax / 6`` correctly rounded
  once, the quotient by ``g`` correctly rounded from ``1 / g`` (Markstein, as for the values),
  E4M3 rounding by the hardware's conversion (round to nearest even, as torch);
- ``s = fp8 * g`` rounded to float32, its reciprocal correctly rounded (one division per block
  and candidate), then each value's E2M1 Q -> DQ and squared error as in ``nvfp4_sweep``.

The candidates and the values are first multiplied by one power of two (``normalised_candidates``,
exact), so every operand of the divisions is normal; the losses are scaled back in float64.
Each tile sums its blocks' squares in float32 into a slot of its own, torch adds the slots in
float64: the losses agree with the torch path's float64 sums to about 1e-7 relative, so the
choice is the torch path's except where two candidates tie to float32 accuracy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from qcal_export.calibrators.kernels.mse_sweep import _quotient
from qcal_export.calibrators.kernels.nvfp4_blocks import _block_values, _loss_and_bound
from qcal_export.calibrators.kernels.nvfp4_prep import normalised_candidates
from qcal_export.spec.formats import FP8_SUBNORMAL_MIN, NVFP4Format

WARPS = 4
BLOCKS_PER_THREAD = 2
"""Two blocks per thread share each candidate's loads and loop overhead."""


@triton.jit
def _block_scale(a6, g, g_inverse, SCALE_MIN: tl.constexpr, SCALE_MAX: tl.constexpr):
    """The effective scale ``fp8(clamp(a6 / g)) * g`` of blocks whose ``amax / 6`` is ``a6``."""
    raw = tl.minimum(tl.maximum(_quotient(a6, g, g_inverse), SCALE_MIN), SCALE_MAX)
    return libdevice.mul_rn(raw.to(tl.float8e4nv).to(tl.float32), g)  # never contracted


@triton.jit(do_not_specialize=["num_blocks"])
def _global_sweep_kernel(
    x_ptr,
    num_blocks,
    scale_ptr,
    recip_ptr,
    norm_ptr,
    partial_ptr,
    num_cand,
    SCALE_MIN: tl.constexpr,
    SCALE_MAX: tl.constexpr,
    TILE: tl.constexpr,
):
    blocks = tl.program_id(0) * TILE + tl.arange(0, TILE)
    inside = blocks < num_blocks
    xs, amax = _block_values(x_ptr, blocks, inside, norm_ptr)  # masked lanes: zeros, no error
    a6 = tl.div_rn(amax, 6.0)
    out = partial_ptr + tl.program_id(0).to(tl.int64) * num_cand
    for k in range(num_cand):
        g = tl.load(scale_ptr + k)
        s = _block_scale(a6, g, tl.load(recip_ptr + k), SCALE_MIN, SCALE_MAX)
        r = tl.div_rn(tl.full([TILE], 1.0, tl.float32), s)
        loss, _ = _loss_and_bound(xs, (), 1.0, s, r, False)
        tl.store(out + k, tl.sum(loss, 0))


def nvfp4_global_sweep_(
    losses: torch.Tensor, groups: torch.Tensor, global_scale: torch.Tensor, fmt: NVFP4Format
) -> torch.Tensor:
    """Add each candidate's summed squared NVFP4 Q -> DQ error to ``losses`` ``[1, K]``
    (float64), in place. ``groups`` ``[1, n]`` (float32/bf16/fp16 on CUDA) holds the blocks of
    16 one after another (``PerTensorGroup.groups``); ``global_scale`` ``[K, 1]`` float32."""
    blocks = groups.reshape(-1, fmt.block_size).contiguous()
    scaled, recip, norm, loss_norm = normalised_candidates(global_scale.reshape(-1).contiguous())
    num_cand, tile = scaled.shape[0], 32 * WARPS * BLOCKS_PER_THREAD
    programs = triton.cdiv(blocks.shape[0], tile)
    partial = torch.empty(programs, num_cand, dtype=torch.float32, device=groups.device)
    _global_sweep_kernel[(programs,)](
        blocks,
        blocks.shape[0],
        scaled,
        recip,
        norm,
        partial,
        num_cand,
        SCALE_MIN=FP8_SUBNORMAL_MIN,
        SCALE_MAX=fmt.scale_max,
        TILE=tile,
        num_warps=WARPS,
    )
    return losses.add_(partial.sum(0, dtype=torch.float64).mul_(loss_norm)[None])

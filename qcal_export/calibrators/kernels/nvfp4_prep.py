"""The per-call inputs of the NVFP4 kernels, each made by one small kernel on the device.

- ``normalised_candidates``: the candidate scales times ``2^k`` (so that the global scale lies
  in [1, 2): every operand of the Markstein division is then normal and no square under- or
  overflows for in-range blocks), their correctly rounded reciprocals, ``2^k`` and ``2^-2k``,
  the factor that brings a normalised loss back to the torch path's units.
- ``prepared_hessian``: ``H`` normalised by a power of two ``2^m``, its upper triangle packed
  with the off-diagonals doubled, entry-major (``[136, per_row]``: the lanes of a tile hold
  consecutive blocks, so consecutive matrices, and load each entry in one coalesced read), its
  max absolute row sum ``rho`` and, for the pruned choice, the Schur floors (``[16, per_row]``):
  per element ``i`` the least ``dᵀ H d`` with ``d_i = 1``, ``1 / (H⁻¹)_ii``,
  from an in-register float64 Gauss-Jordan inverse.

One launch each instead of a few dozen small torch operations and the batched ``eigvalsh`` /
``inv`` (whose error checks wait for the device): on a 4096 x 4096 weight these cost more host
time than the scoring kernels take on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qcal_export.calibrators.kernels.nvfp4_blocks import PLAIN_TOLERANCE, TOLERANCE

BLOCK = 16
"""NVFP4 block size: the elements one thread holds."""
PACKED = BLOCK * (BLOCK + 1) // 2
"""Upper triangle of a 16 x 16 Hessian: 136 entries, off-diagonals doubled."""
CONDITION_LIMIT = 1e8
"""Hessian blocks whose 1-norm condition number ``‖H‖₁ ‖H⁻¹‖₁`` (at least the 2-norm one for a
symmetric ``H``) reaches this get no Schur floor (0: no bound from it); float64 inverses of the
others are good to far below the floor's 1e-6 margin."""
FLOOR_MARGIN = 1.0 - 1e-6
"""Floors are rounded down by this factor: it covers the inverse's float64 error."""


@triton.jit
def _pow2(e):
    """``2^e`` in float64 for an int64 ``e`` in [-1022, 1023]."""
    return ((e + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _binade(t):
    """``floor(log2 t)`` for a positive normal float64 ``t`` (int64)."""
    return ((t.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1023


@triton.jit
def _candidates_kernel(
    scale_ptr, num_cand, scaled_ptr, recip_ptr, norm_ptr, loss_norm_ptr, BLOCK_K: tl.constexpr
):
    """``k = -floor(log2(max(scales) / 448))`` (0 for 0); the outputs described above."""
    lanes = tl.arange(0, BLOCK_K)
    inside = lanes < num_cand
    s = tl.load(scale_ptr + lanes, mask=inside, other=0.0)
    t = tl.div_rn(tl.max(s, 0), 448.0).to(tl.float64)  # float32 quotient, as torch rounds it
    k = tl.where(t > 0, -_binade(t), 0)
    norm = _pow2(k).to(tl.float32)
    scaled = s * norm
    tl.store(scaled_ptr + lanes, scaled, mask=inside)
    tl.store(recip_ptr + lanes, tl.div_rn(tl.full([BLOCK_K], 1.0, tl.float32), scaled), mask=inside)
    tl.store(norm_ptr, norm)
    tl.store(loss_norm_ptr, _pow2(-2 * k))


def normalised_candidates(
    scales: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For ascending float32 effective scales ``[K]`` on CUDA: ``scales * 2^k``, their
    reciprocals (float32 ``[K]``), ``2^k`` (float32 ``[1]``) and ``2^-2k`` (float64 ``[1]``)."""
    num_cand = scales.shape[0]
    scaled, recip = torch.empty_like(scales), torch.empty_like(scales)
    norm = torch.empty(1, dtype=torch.float32, device=scales.device)
    loss_norm = torch.empty(1, dtype=torch.float64, device=scales.device)
    _candidates_kernel[(1,)](
        scales,
        num_cand,
        scaled,
        recip,
        norm,
        loss_norm,
        BLOCK_K=triton.next_power_of_2(num_cand),
        num_warps=4,
    )
    return scaled, recip, norm, loss_norm


@triton.jit
def _hessian_kernel(
    h_ptr,
    h_max_ptr,
    loss_norm_ptr,
    packed_ptr,
    rho_ptr,
    floor_ptr,
    out_loss_norm_ptr,
    FLOORS: tl.constexpr,
    LIMIT: tl.constexpr,
    MARGIN: tl.constexpr,
):
    """Matrix ``program_id(0)``: packed ``H 2^m``, ``rho`` and (``FLOORS``) its Schur floors;
    program 0 also writes ``loss_norm * 2^-m``."""
    g = tl.program_id(0)
    rows = tl.arange(0, 16)[:, None]
    cols = tl.arange(0, 16)[None, :]
    h_max = tl.load(h_max_ptr)
    m = tl.where(h_max > 0, -tl.minimum(tl.maximum(_binade(h_max), -1022), 1022), 0)
    h = tl.load(h_ptr + g.to(tl.int64) * 256 + rows * 16 + cols) * _pow2(m)
    packed = tl.where(rows == cols, h, 2.0 * h).to(tl.float32)
    index = rows * 16 - (rows * (rows - 1)) // 2 + (cols - rows)
    per_row = tl.num_programs(0)
    tl.store(packed_ptr + index.to(tl.int64) * per_row + g, packed, mask=rows <= cols)
    rho = tl.max(tl.sum(tl.abs(h), axis=1), axis=0)
    tl.store(rho_ptr + g, rho.to(tl.float32))
    if g == 0:
        tl.store(out_loss_norm_ptr, tl.load(loss_norm_ptr) * _pow2(-m))
    if FLOORS:
        inverse, positive = _gauss_jordan_inverse(h, rows, cols)
        kappa = rho * tl.max(tl.sum(tl.abs(inverse), axis=0), axis=0)
        diagonal = tl.sum(tl.where(rows == cols, inverse, 0.0), axis=1)
        usable = positive & (kappa < LIMIT)
        floors = tl.where(usable, tl.maximum(MARGIN / diagonal, 0.0), 0.0)
        entries = tl.arange(0, 16).to(tl.int64) * per_row
        tl.store(floor_ptr + entries + g, floors.to(tl.float32))


@triton.jit
def _gauss_jordan_inverse(a, rows, cols):
    """``a⁻¹`` of a ``[16, 16]`` float64 tile by Gauss-Jordan without pivoting, and whether
    every pivot was positive (for a symmetric ``a``: whether it is positive definite)."""
    positive = tl.full((), True, tl.int1)
    for p in tl.static_range(16):
        row = tl.sum(tl.where(rows == p, a, 0.0), axis=0)
        col = tl.sum(tl.where(cols == p, a, 0.0), axis=1)
        pivot = tl.sum(tl.where(tl.arange(0, 16) == p, row, 0.0), axis=0)
        positive = positive & (pivot > 0)
        inv_pivot = 1.0 / pivot
        scaled_row = (row * inv_pivot)[None, :]
        eliminated = a - col[:, None] * scaled_row
        pivot_col = -col[:, None] * inv_pivot
        a = tl.where(
            rows == p,
            tl.where(cols == p, inv_pivot, scaled_row),
            tl.where(cols == p, pivot_col, eliminated),
        )
    return a, positive


def prepared_hessian(
    hessian: torch.Tensor, loss_norm: torch.Tensor, *, floors: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For float64 ``hessian`` ``[per_row, 16, 16]`` on CUDA: the packed ``H 2^m`` (float32
    ``[136, per_row]``), ``rho`` (float32 ``[per_row]``), the Schur floors (float32
    ``[16, per_row]``, 0 for blocks not positive definite or ill-conditioned; empty without
    ``floors``) and ``loss_norm * 2^-m`` (float64 ``[1]``)."""
    per_row, device = hessian.shape[0], hessian.device
    hessian = hessian.contiguous()
    packed = torch.empty(PACKED, per_row, dtype=torch.float32, device=device)
    rho = torch.empty(per_row, dtype=torch.float32, device=device)
    schur = torch.empty(BLOCK, per_row if floors else 0, dtype=torch.float32, device=device)
    out_loss_norm = torch.empty(1, dtype=torch.float64, device=device)
    _hessian_kernel[(per_row,)](
        hessian,
        torch.linalg.vector_norm(hessian, float("inf")).reshape(1),
        loss_norm,
        packed,
        rho,
        schur,
        out_loss_norm,
        FLOORS=floors,
        LIMIT=CONDITION_LIMIT,
        MARGIN=FLOOR_MARGIN,
        num_warps=1,
    )
    return packed, rho, schur, out_loss_norm


@dataclass(frozen=True)
class Operands:
    """The candidates and the Hessian of one call as the NVFP4 kernels read them.

    ``scales`` ``[K]`` float32, and from ``normalised_candidates`` ``scaled``, ``recip``,
    ``norm``, ``loss_norm``; from ``prepared_hessian`` ``packed``, ``rho``, ``schur``, with
    ``h64`` the float64 Hessian ``[per_row, 16, 16]``; ``weighted``: the loss is ``dᵀ H d``,
    not squared error. Without a Hessian the Hessian fields are ``scaled``: the kernels take a
    pointer there but never read it.
    """

    scales: torch.Tensor
    scaled: torch.Tensor
    recip: torch.Tensor
    norm: torch.Tensor
    loss_norm: torch.Tensor
    packed: torch.Tensor
    rho: torch.Tensor
    schur: torch.Tensor
    h64: torch.Tensor
    per_row: int
    weighted: bool

    @property
    def tolerance(self) -> float:
        """The relative float32 error bound of a loss, above which near ties are redone."""
        return TOLERANCE if self.weighted else PLAIN_TOLERANCE


def kernel_operands(
    scales: torch.Tensor, hessian: torch.Tensor | None, device: torch.device, *, floors: bool
) -> Operands:
    """``scales`` ``[K]`` ascending effective scales and ``hessian`` ``[per_row, 16, 16]`` or
    None, moved to ``device`` and prepared for the kernels (Schur floors only with ``floors``)."""
    scales = scales.to(device=device, dtype=torch.float32).contiguous()
    scaled, recip, norm, loss_norm = normalised_candidates(scales)
    if hessian is None:
        return Operands(scales, scaled, recip, norm, loss_norm, *[scaled] * 4, 1, False)
    h64 = hessian.to(device=device, dtype=torch.float64).contiguous()
    packed, rho, schur, loss_norm = prepared_hessian(h64, loss_norm, floors=floors)
    per_row = hessian.shape[0]
    return Operands(scales, scaled, recip, norm, loss_norm, packed, rho, schur, h64, per_row, True)

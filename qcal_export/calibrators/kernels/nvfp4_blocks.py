"""The NVFP4 kernels' shared block arithmetic: E2M1 Q -> DQ, a block's values and packed
Hessian, its loss and error bound, the best-two tracking, the float64 recomputation.

``nvfp4_sweep.py`` says what the arithmetic is and why it is exact where it must be; the sweep
(``nvfp4_sweep``), the pruned choice (``nvfp4_best``, ``nvfp4_ranges``) and the global-amax sweep
(``nvfp4_global``) build their kernels from these functions.
"""

# Triton's JIT builds tuples by concatenation; it does not take ``(*xs, x)``.
# ruff: noqa: RUF005

from __future__ import annotations

import triton
import triton.language as tl

TOLERANCE = 2.0**-18
"""Bound on a Hessian-weighted loss's float32 error relative to ``rho |d|^2`` (about 35 units of
2^-24 worst case: H rounded, d, two 16-term FMA chains), ``rho`` the max absolute row sum."""
PLAIN_TOLERANCE = 2.0**-19
"""Bound on a squared-error loss's relative float32 error (18 units of 2^-24 worst case)."""
RANGE_LIMIT = 2.0**40
"""Normalised magnitudes above this could overflow float32 squares: such blocks are recomputed."""


@triton.jit
def _e2m1_dequant(ax, s, neg_s, r, MARKSTEIN: tl.constexpr):
    """``round_e2m1(ax / s) * s`` in float32 for ``ax >= 0``, as formats.py computes it."""
    if MARKSTEIN:
        q0 = ax * r
        e = tl.fma(q0, neg_s, ax)
        y = tl.fma(e, r, q0)
    else:
        y = tl.math.div_rn(ax, s)
    v = tl.minimum(y, 6.0)
    binade = (v.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    c = tl.maximum(binade, 1.0)
    t = tl.fma(c, 6291456.0, v)
    q = tl.fma(c, -6291456.0, t)
    return q * s


@triton.jit
def _quadratic_form(hs, ds):
    """``dᵀ H d`` from the packed upper triangle (off-diagonals doubled): 136 FMAs."""
    loss = tl.zeros_like(ds[0])
    for i in tl.static_range(16):
        u = hs[i * 16 - (i * (i - 1)) // 2] * ds[i]
        for j in tl.static_range(i + 1, 16):
            u = tl.fma(hs[i * 16 - (i * (i - 1)) // 2 + j - i], ds[j], u)
        loss = tl.fma(ds[i], u, loss)
    return loss


@triton.jit
def _block_values(x_ptr, blocks, inside, norm_ptr):
    """A tile's normalised ``|x|`` (16 ``[TILE]`` values) and their amax."""
    base = x_ptr + blocks.to(tl.int64) * 16
    norm = tl.load(norm_ptr)
    xs = ()
    amax = tl.zeros(blocks.shape, tl.float32)
    for j in tl.static_range(16):
        axj = tl.abs(tl.load(base + j, mask=inside, other=0.0).to(tl.float32)) * norm
        amax = tl.maximum(amax, axj)
        xs = xs + (axj,)
    return xs, amax


@triton.jit
def _block_hessian(x_ptr, blocks, inside, h_ptr, rho_ptr, per_row, HESSIAN: tl.constexpr):
    """The tile's signed packed ``H`` and its row-sum bound ``rho`` (1 for squared error)."""
    rho = tl.full(blocks.shape, 1.0, tl.float32)
    hs = ()
    if HESSIAN:
        group = blocks % per_row
        rho = tl.load(rho_ptr + group, mask=inside, other=0.0)
        hs = _signed_hessian(x_ptr + blocks.to(tl.int64) * 16, h_ptr, group, per_row, inside)
    return hs, rho


@triton.jit
def _signed_hessian(base, h_ptr, group, per_row, inside):
    """The block's packed ``H`` (entry-major ``[136, per_row]``) with the value signs folded
    into its off-diagonals."""
    signs = ()
    for j in tl.static_range(16):
        xj = tl.load(base + j, mask=inside, other=0.0)
        signs = signs + (tl.where(xj < 0, -1.0, 1.0),)
    hs = ()
    for i in tl.static_range(16):
        for j in tl.static_range(i, 16):
            entry = i * 16 - (i * (i - 1)) // 2 + (j - i)
            h = tl.load(h_ptr + entry * per_row + group, mask=inside, other=0.0)
            if j != i:
                h = h * (signs[i] * signs[j])
            hs = hs + (h,)
    return hs


@triton.jit
def _loss_and_bound(xs, hs, rho, s, r, HESSIAN: tl.constexpr):
    """Float32 loss of scale ``s`` and the quantity its error bound is relative to."""
    neg_s = -s
    loss = tl.zeros_like(xs[0])
    if HESSIAN:
        ds = ()
        plain = tl.zeros_like(xs[0])
        for j in tl.static_range(16):
            d = _e2m1_dequant(xs[j], s, neg_s, r, True) - xs[j]
            plain = tl.fma(d, d, plain)
            ds = ds + (d,)
        return _quadratic_form(hs, ds), rho * plain
    for j in tl.static_range(16):
        d = _e2m1_dequant(xs[j], s, neg_s, r, True) - xs[j]
        loss = tl.fma(d, d, loss)
    return loss, loss


@triton.jit
def _track_best(loss, bound, k, best, second, best_bound, second_bound, best_k):
    """Fold candidate ``k``'s loss (and its error bound) into the best and second-best loss,
    their bounds and the best's index (the first on ties)."""
    below_best = loss < best
    below_second = loss < second
    second_bound = tl.where(below_best, best_bound, tl.where(below_second, bound, second_bound))
    second = tl.where(below_best, best, tl.where(below_second, loss, second))
    best_bound = tl.where(below_best, bound, best_bound)
    best_k = tl.where(below_best, k, best_k)
    best = tl.where(below_best, loss, best)
    return best, second, best_bound, second_bound, best_k


@triton.jit
def _untracked(TILE: tl.constexpr):
    """``_track_best``'s state before any candidate."""
    inf = tl.full([TILE], float("inf"), tl.float32)
    zero = tl.zeros([TILE], tl.float32)
    return inf, inf, zero, zero, tl.zeros([TILE], tl.int32)


@triton.jit
def _flagged_values(x_ptr, blocks, flagged, h_ptr, per_row):
    """For the float64 repair: the flagged lanes' ``|x|`` (float32), their signs (float64) and
    the float64 ``[16, 16]`` rows of each lane's ``H``."""
    base = x_ptr + blocks.to(tl.int64) * 16
    xs = ()
    signs = ()
    for j in tl.static_range(16):
        xj = tl.load(base + j, mask=flagged, other=0.0).to(tl.float32)
        xs = xs + (tl.abs(xj),)
        signs = signs + (tl.where(xj < 0, -1.0, 1.0).to(tl.float64),)
    return xs, signs, h_ptr + (blocks % per_row).to(tl.int64) * 256


@triton.jit
def _exact_loss(xs, signs, s, hrow, needed, TILE: tl.constexpr, HESSIAN: tl.constexpr):
    """Float64 loss of scale ``s`` as the torch path computes it: ``sum d^2`` or ``dᵀ H d``
    with ``d = fl32(q s) - x`` (``hrow``: float64 ``[16, 16]`` rows of each lane's ``H``)."""
    ds = ()
    exact = tl.zeros([TILE], tl.float64)
    for j in tl.static_range(16):
        xq = _e2m1_dequant(xs[j], s, s, s, False)
        d = xq.to(tl.float64) - xs[j].to(tl.float64)
        if HESSIAN:
            ds = ds + (d * signs[j],)
        else:
            exact += d * d
    if HESSIAN:
        for i in tl.static_range(16):
            hd = tl.zeros([TILE], tl.float64)
            for j in tl.static_range(16):
                h = tl.load(hrow + i * 16 + j, mask=needed, other=0.0)
                hd += h * ds[j]
            exact += ds[i] * hd
    return exact

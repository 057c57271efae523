"""Shared by test_shrink_mse.py: a float64 brute force of the shrink-grid observer, written as
the definition reads, and the batches the tests feed.

The oracle takes groups already made with numpy (NaN where a partial group has no element, so
padding is never assumed harmless), loops over batches and candidates, fake-quantizes in numpy
float32 (ml_dtypes for FP8) and stops as the observer does. A plain module, imported by name.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from qcal_export.spec.formats import AMAX_FLOOR, SCALE_FLOOR

F32, F64 = np.float32, np.float64


def floored_scale(width, levels):
    """``width / levels`` in float32, a zero width at AMAX_FLOOR, never below SCALE_FLOOR."""
    width = np.where(width == 0, F32(AMAX_FLOOR), width).astype(F32)
    return np.maximum(width / F32(levels), F32(SCALE_FLOOR))


E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])

# the oracle: fake-quantization -------------------------------------------------------------


def int_quant(fmt):
    """Q -> DQ of ``x`` ``[G, n]`` for ranges ``amin``/``amax`` ``[G]`` (numpy float32)."""
    qmin, qmax = fmt.qmin, fmt.qmax

    def quant(x, amin, amax):
        amin, amax = amin[:, None], amax[:, None]
        if fmt.symmetric:
            scale = floored_scale(np.maximum(np.abs(amin), np.abs(amax)), qmax)
            return np.clip(np.round(x / scale), qmin, qmax) * scale
        lo, hi = np.minimum(amin, F32(0)), np.maximum(amax, F32(0))
        scale = floored_scale(hi - lo, qmax - qmin)
        zero_point = np.clip(np.round(F32(qmin) - lo / scale), qmin, qmax)
        return (np.clip(np.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale

    return quant


def fp8_quant(x, amin, amax):
    scale = floored_scale(np.maximum(np.abs(amin), np.abs(amax)), 448)[:, None]
    codes = np.clip(x / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return codes.astype(F32) * scale


def e2m1(y):
    """Nearest E2M1 value, exact ties to the even code, saturating at ±6; NaN stays NaN."""
    distance = np.abs(np.abs(y).astype(F64)[..., None] - E2M1)
    nearest = distance == distance.min(-1, keepdims=True)
    code = np.argmin(np.where(nearest, np.arange(8) % 2, 2), axis=-1)
    return (np.sign(y) * E2M1[code]).astype(F32)


def fp8_block_scale(block_amax, global_scale):
    raw = (block_amax / F32(6)) / global_scale
    return np.clip(raw, F32(2**-9), F32(448)).astype(ml_dtypes.float8_e4m3fn).astype(F32)


def global_scale_of(amax):
    """NVFP4's global scale, at least the floor whose 2**-9 multiple is SCALE_FLOOR."""
    return np.maximum(floored_scale(F32(amax), 6 * 448), F32(SCALE_FLOOR / 2**-9))


def nvfp4_global_quant(x, amin, amax):
    """Shrunk global amax; ``x`` ``[1, blocks, 16]``, each block's FP8 scale from the block."""
    bound = np.maximum(np.abs(amin), np.abs(amax))
    global_scale = global_scale_of(bound)[:, None, None]
    block_amax = np.nanmax(np.abs(x), axis=-1, keepdims=True)
    effective = fp8_block_scale(block_amax, global_scale) * global_scale
    return e2m1(x / effective) * effective


def nvfp4_block_quant(global_amax):
    """Shrunk block amaxes; ``x`` ``[G, 16]``, the global scale of ``global_amax``."""
    global_scale = global_scale_of(global_amax)

    def quant(x, amin, amax):
        bound = np.maximum(np.abs(amin), np.abs(amax))[:, None]
        effective = fp8_block_scale(bound, global_scale) * global_scale
        return e2m1(x / effective) * effective

    return quant


# the oracle: grouping, search, moving average ----------------------------------------------


def pad_nan(values: list[np.ndarray], size: int) -> np.ndarray:
    return np.array([np.pad(v, (0, size - len(v)), constant_values=np.nan) for v in values])


def last_axis_blocks(x, size):
    rows = x.reshape(-1, x.shape[-1])
    return pad_nan([r[b : b + size] for r in rows for b in range(0, len(r), size)], size)


def g_idx_groups(x, size, g_idx):
    rows = x.reshape(-1, x.shape[-1])
    return pad_nan([r[g_idx == g] for r in rows for g in range(g_idx.max() + 1)], size)


def tiles_2d(x, rows, cols):
    return pad_nan(
        [
            m[r : r + rows, c : c + cols].reshape(-1)
            for m in x.reshape(-1, *x.shape[-2:])
            for r in range(0, m.shape[0], rows)
            for c in range(0, m.shape[1], cols)
        ],
        rows * cols,
    )


def oracle(batches, make_quant, *, maxshrink=0.2, grid=100, norm=2.4, patience=5, constant=0.01):
    """Running (min, max) float64 ``[G]`` over ``batches`` (each ``(groups, raw batch)``), and per
    batch the number of candidates scored and of groups whose winner is shrunk (not ``p = 1``).

    ``make_quant(raw batches so far)`` gives the batch's fake-quantization.
    """
    running, scored, shrunk = None, [], []
    for t, (values, _) in enumerate(batches):
        quant = make_quant([raw for _, raw in batches[: t + 1]])
        flat = values.reshape(len(values), -1)
        lo = np.minimum(np.nanmin(flat, axis=1), F32(0))
        hi = np.maximum(np.nanmax(flat, axis=1), F32(0))
        best = np.full(len(values), np.inf)
        winner = [np.zeros(len(values), F32), np.zeros(len(values), F32)]
        index = np.zeros(len(values), dtype=np.int64)
        idle = 0
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            amin, amax = (p * lo.astype(F64)).astype(F32), (p * hi.astype(F64)).astype(F32)
            xq = quant(values, amin, amax)
            assert xq.dtype == F32
            diff = np.abs(xq.astype(F64) - values.astype(F64)).reshape(len(values), -1)
            error = np.nansum(diff**norm, axis=1)
            better = error < best
            best = np.where(better, error, best)
            winner = [np.where(better, amin, winner[0]), np.where(better, amax, winner[1])]
            index = np.where(better, i, index)
            idle = 0 if better.any() else idle + 1
            if idle >= patience:
                break
        scored.append(i + 1)
        shrunk.append(int((index > 0).sum()))
        found = [w.astype(F64) for w in winner]
        running = (
            found
            if running is None
            else [r + constant * (f - r) for r, f in zip(running, found, strict=True)]
        )
    return running, scored, shrunk


def expected_range(fmt, running):
    amin, amax = (r.astype(F32) for r in running)
    if fmt.symmetric:
        bound = np.maximum(np.abs(amin), np.abs(amax))
        return -bound, bound
    return amin, amax


def sequential_search(errors: np.ndarray, patience: int) -> tuple[np.ndarray, int]:
    """Each group's winning candidate of an error matrix ``[K, G]``, and the candidates scored."""
    best, index, idle = np.full(errors.shape[1], np.inf), np.zeros(errors.shape[1], np.int64), 0
    for k, error in enumerate(errors):
        better = error < best
        best, index = np.where(better, error, best), np.where(better, k, index)
        idle = 0 if better.any() else idle + 1
        if idle >= patience:
            return index, k + 1
    return index, len(errors)


def make_batches(shape, fmt, seed, count=3):
    """Heavy-tailed float32 batches, a gain per column; mostly positive for asymmetric formats."""
    rng = np.random.default_rng(seed)
    gains = np.geomspace(0.05, 20.0, shape[-1])
    out = []
    for level in (1.0, 1.7, 0.6, 1.2)[:count]:
        x = rng.standard_t(3.0, size=shape) * gains * level
        if not fmt.symmetric:
            x = x + 1.5 * gains * level
        out.append(x.astype(F32))
    return out

"""A float64 brute force of the MX formats from the OCP MX spec's definition, and weights that
exercise it: per block of 32 along the reduction axis (the last block partial),
``e = floor(log2(amax)) - emax`` within [-127, 127] (a zero block: -127), then each ``x / 2^e``
goes to the nearest value of the element grid (enumerated from its bits), a tie to the even
code, saturating at the largest value; the value is that times ``2^e``.
"""

from __future__ import annotations

import math

import numpy as np

K, N = 70, 6
"""Weight [K, N] blocked along K (axis 0): blocks of 32, 32 and a partial 6."""


def element_grid(exponent_bits: int, mantissa_bits: int, bias: int, fn: bool) -> np.ndarray:
    """Positive values of a float element type by code (code order is value order)."""
    values = []
    for code in range(2 ** (exponent_bits + mantissa_bits)):
        exponent, mantissa = code >> mantissa_bits, code & (2**mantissa_bits - 1)
        if fn and exponent == 2**exponent_bits - 1 and mantissa == 2**mantissa_bits - 1:
            continue  # E4M3FN: the all-ones code is NaN
        if exponent == 0:
            values.append(mantissa / 2**mantissa_bits * 2.0 ** (1 - bias))
        else:
            values.append((1 + mantissa / 2**mantissa_bits) * 2.0 ** (exponent - bias))
    return np.array(values)


GRIDS = {"mxfp8": (element_grid(4, 3, 7, True), 8), "mxfp4": (element_grid(2, 1, 1, False), 2)}


def round_to_grid(y: float, grid: np.ndarray) -> float:
    """Nearest grid value to |y| (a tie to the even code), saturating; y's sign."""
    magnitude = min(abs(y), grid[-1])
    distance = np.abs(grid - magnitude)
    nearest = np.flatnonzero(distance == distance.min())
    code = nearest[0] if len(nearest) == 1 else next(c for c in nearest if c % 2 == 0)
    return math.copysign(grid[code], y)


def brute_force(weight: np.ndarray, name: str, lowest: int = -127) -> tuple[np.ndarray, np.ndarray]:
    """(dequantized weight, exponents [blocks, N]) of ``weight`` [K, N] in float64; exponents
    at least ``lowest`` (a zero block: ``lowest``)."""
    grid, emax = GRIDS[name]
    out = np.zeros(weight.shape)
    exponents = []
    for start in range(0, weight.shape[0], 32):
        block = weight[start : start + 32].astype(np.float64)
        row = []
        for j in range(weight.shape[1]):
            amax = np.abs(block[:, j]).max()
            e = lowest if amax == 0 else math.floor(math.log2(amax)) - emax
            e = min(max(e, lowest), 127)
            row.append(e)
            for i, x in enumerate(block[:, j]):
                out[start + i, j] = round_to_grid(x / 2.0**e, grid) * 2.0**e
        exponents.append(row)
    return out, np.array(exponents)


def weight_cases(name: str) -> np.ndarray:
    """A [K, N] weight with ties, saturation edges, element subnormals and a zero column."""
    rng = np.random.default_rng(7)
    w = rng.standard_t(3, (K, N)).astype(np.float32)
    grid, emax = GRIDS[name]
    ties = (grid[:-1] + grid[1:]) / 2  # exact midpoints between neighbours
    w[: len(ties[:31]), 1] = ties[:31] * 2.0**-3
    w[31, 1] = grid[-1] * 2.0**-3  # amax sets e = floor(log2(max)) - emax
    w[:32, 2] = np.linspace(-1, 1, 32) * (2.0 ** (emax + 1) - 1e-3)  # amax just below 2^(emax+1)
    w[:, 3] = 0.0
    w[32:, 4] = rng.standard_normal(K - 32) * 1e-3
    w[40, 4] = 300.0  # one outlier: the others fall to element subnormals or zero
    return w

"""FP4 E2M1 element numerics, shared by NVFP4 and MXFP4: rounding onto the grid and the 4-bit
codes (bit 3 the sign, codes 0..7 the magnitudes of E2M1_VALUES)."""

from __future__ import annotations

import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""FP4 E2M1 magnitudes by code 0..7; code | 8 is the negative value (bit 3 is the sign)."""
E2M1_MAX = E2M1_VALUES[-1]


def round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Round float32 ``y`` to the E2M1 grid, half to even, saturating at ±6.

    The grid spacing is 0.5 below 2, 1 below 4 and 2 up to 6, so scaling by the spacing,
    rounding half-even and scaling back is exact.
    """
    y = y.clamp(-E2M1_MAX, E2M1_MAX)
    magnitude = y.abs()
    step = torch.where(magnitude < 2, 0.5, torch.where(magnitude < 4, 1.0, 2.0))
    return torch.round(y / step) * step


def encode_e2m1(values: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, 0..15, bit 3 the sign) of values already on the E2M1 grid.

    Zero is always code 0 (a rounded -0.0 too), which decodes to the same value as code 8.
    """
    magnitude = values.abs().to(torch.float32)
    grid = torch.tensor(E2M1_VALUES, device=values.device)
    code = torch.searchsorted(grid, magnitude.contiguous()).to(torch.uint8)
    return torch.where(torch.signbit(values) & (magnitude > 0), code | 8, code)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of E2M1 codes (uint8, 0..15, bit 3 the sign): ``encode_e2m1``'s inverse,
    code 8 decoding to -0.0."""
    grid = torch.tensor(E2M1_VALUES, device=codes.device)
    magnitude = grid[(codes & 7).long()]
    return torch.where((codes & 8) > 0, -magnitude, magnitude)

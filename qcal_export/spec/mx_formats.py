"""OCP Microscaling formats: MXFP8 (E4M3 elements) and MXFP4 (E2M1 elements).

A block of 32 elements along the reduction axis shares one E8M0 scale, a power of two
``2^e``: the spec's rule is ``e = floor(log2(block_amax)) - emax_elem`` (8 for E4M3, 2 for E2M1),
kept within E8M0's ``[-127, 127]``; each element is ``x / 2^e`` rounded half to even onto the
element grid, saturating at its largest value (448, 6), as QuantizeLinear casts it. Weights get
their exponents from calibration (the rule, or mx-mse's choice); activations get theirs in the
graph at run time from each block's amax (graphs/mx.py), so they need no calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from onnx import TensorProto

from qcal_export.spec.e2m1 import decode_e2m1, encode_e2m1, round_e2m1

E8M0_BIAS = 127
"""An E8M0 code is ``e + 127``; code 255 is NaN, so exponents run from -127 to 127."""
E8M0_MIN, E8M0_MAX = -E8M0_BIAS, E8M0_BIAS


def e8m0_codes(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 codes (uint8) of float32 powers of two in ``[2^-127, 2^127]``."""
    _, exponent = torch.frexp(scale.to(torch.float32))
    return (exponent - 1 + E8M0_BIAS).to(torch.uint8)


def e8m0_values(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values ``2^(code - 127)`` of E8M0 codes (uint8, 0..254)."""
    exponent = codes.to(torch.int32) - E8M0_BIAS
    return torch.ldexp(torch.ones(codes.shape, dtype=torch.float32), exponent)


def floor_log2(amax: torch.Tensor) -> torch.Tensor:
    """``floor(log2(amax))`` exactly (int32) for positive float32 ``amax``; E8M0_MIN for 0."""
    mantissa, exponent = torch.frexp(amax.to(torch.float32))
    return torch.where(mantissa > 0, exponent - 1, torch.full_like(exponent, E8M0_MIN))


@dataclass(frozen=True)
class MXFormat:
    """An MX format: ``emax`` and ``qmax`` of its element type. Subclasses round onto the
    element grid (``round_elements``), store (``quantize``) and decode (``decode``) elements."""

    name: str
    emax: int
    qmax: float
    onnx_type: int
    storage_dtype: torch.dtype
    symmetric: ClassVar[bool] = True
    block_size: ClassVar[int] = 32
    two_level: ClassVar[bool] = False
    integer: ClassVar[bool] = False
    weight_only: ClassVar[bool] = False
    default_block_size: ClassVar[int | None] = 32
    shared_exponent: ClassVar[bool] = True
    scale_onnx_type: ClassVar[int] = TensorProto.FLOAT8E8M0
    min_opset: ClassVar[int] = 24

    def exponent(self, amax: torch.Tensor, lowest: int = E8M0_MIN) -> torch.Tensor:
        """The spec's shared exponent of each block amax (int32): ``floor(log2(amax)) - emax``
        within ``[lowest, 127]``; a zero block gets ``lowest``."""
        return (floor_log2(amax) - self.emax).clamp(max(lowest, E8M0_MIN), E8M0_MAX)

    def scale_of(self, exponent: torch.Tensor) -> torch.Tensor:
        """Float32 ``2^exponent`` of int exponents, clamped to E8M0's range."""
        e = exponent.to(torch.int32).clamp(E8M0_MIN, E8M0_MAX)
        return torch.ldexp(torch.ones(e.shape, dtype=torch.float32), e)

    def scale_zero_point(
        self, amin: torch.Tensor, amax: torch.Tensor, scale_floor: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The E8M0 scale (float32 ``2^e``) of each block range, and a zero zero point.

        ``scale_floor`` (the smallest positive value of the weight's float type) bounds ``e``
        from below, so that a QuantizeLinear in that type never divides by a scale that
        underflows to 0 there; E8M0 itself holds nothing below ``2^-127``.
        """
        lowest = math.ceil(math.log2(scale_floor)) if scale_floor > 0 else E8M0_MIN
        bound = torch.maximum(amin.abs(), amax.abs())
        scale = self.scale_of(self.exponent(bound, lowest))
        return scale, torch.zeros_like(scale)

    def fake_quant(
        self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None
    ) -> torch.Tensor:
        """QuantizeLinear -> DequantizeLinear in float32; ``scale`` broadcasts against ``x``."""
        shape = torch.broadcast_shapes(x.shape, scale.shape)
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
        return self.fake_quant_into(out, x, scale, zero_point)

    def fake_quant_into(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
    ) -> torch.Tensor:
        """``fake_quant`` written into ``out`` (float32, the broadcast shape)."""
        torch.div(x, scale, out=out)
        out.copy_(self.round_elements(out))
        return out.mul_(scale)

    def fake_quant_dynamic(self, x: torch.Tensor) -> torch.Tensor:
        """Q -> DQ of an activation as the graph computes it: per block of 32 along the last
        axis (``x`` [..., n], n a multiple of 32), the exponent from the block's own amax by
        the spec's rule; a block holding inf or NaN becomes NaN (its scale is NaN). Float32."""
        blocks = x.float().reshape(*x.shape[:-1], -1, self.block_size)
        amax = blocks.abs().amax(-1, keepdim=True)
        finite = torch.isfinite(amax)
        scale = self.scale_of(self.exponent(torch.where(finite, amax, 0.0)))
        out = self.fake_quant(blocks, scale, None)
        return torch.where(finite, out, torch.nan).reshape(x.shape)

    def encode_zero_point(self, zero_point: torch.Tensor) -> torch.Tensor:
        return zero_point.to(self.storage_dtype)


class MXFP8Format(MXFormat):
    """MXFP8: FP8 E4M3FN elements (max 448, emax 8)."""

    def round_elements(self, y: torch.Tensor) -> torch.Tensor:
        clamped = y.to(torch.float32).clamp(-self.qmax, self.qmax)
        return clamped.to(torch.float8_e4m3fn).to(torch.float32)

    def quantize(
        self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None
    ) -> torch.Tensor:
        y = x.to(torch.float32) / scale
        return y.clamp(-self.qmax, self.qmax).to(torch.float8_e4m3fn)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


class MXFP4Format(MXFormat):
    """MXFP4: FP4 E2M1 elements (max 6, emax 2), stored two per byte like NVFP4's."""

    def round_elements(self, y: torch.Tensor) -> torch.Tensor:
        return round_e2m1(y.to(torch.float32))

    def quantize(
        self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None
    ) -> torch.Tensor:
        return encode_e2m1(self.round_elements(x.to(torch.float32) / scale))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return decode_e2m1(codes)


MXFP8 = MXFP8Format("mxfp8", 8, 448.0, TensorProto.FLOAT8E4M3FN, torch.float8_e4m3fn)
MXFP4 = MXFP4Format("mxfp4", 2, 6.0, TensorProto.FLOAT4E2M1, torch.uint8)

"""Number formats: range, rounding, storage encoding and ONNX element type.

Every fake-quantization here is the float32 arithmetic of ONNX QuantizeLinear -> DequantizeLinear:
``q = saturate(round_half_even(x / scale) + zero_point)``, ``x' = (q - zero_point) * scale``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from onnx import TensorProto, helper

from qcal_export.spec.e2m1 import decode_e2m1, encode_e2m1, round_e2m1
from qcal_export.spec.mx_formats import MXFP4, MXFP8, MXFormat

AMAX_FLOOR = 1e-30
"""The amax (and range width) of a zero range: a tensor of zeros, nothing collected, or only
non-finite values skipped. A non-zero amax, however small, keeps its own value."""

SCALE_LIMITS: dict[int, tuple[float, float]] = {
    TensorProto.FLOAT: (2.0**-149, 2.0**-126),
    TensorProto.FLOAT16: (2.0**-24, 2.0**-14),
    TensorProto.BFLOAT16: (2.0**-133, 2.0**-126),
}
"""Per ONNX scale type: (smallest positive value, smallest normal value). A scale is floored at
the first, never rounded to 0; below the second it is subnormal, which ONNX Runtime's CPU
QuantizeLinear/DequantizeLinear compute with exactly (as the reference evaluator does) and a
runtime that flushes denormals to zero reads as 0: such scales get a note, not a floor."""

SCALE_FLOOR = SCALE_LIMITS[TensorProto.FLOAT][0]
"""Smallest positive float32: no float32 scale is ever 0."""


def type_name(elem_type: int) -> str:
    """numpy's name for an ONNX element type (float32, float16, bfloat16), for messages."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name


def floor_zero(amax: torch.Tensor) -> torch.Tensor:
    """``amax`` with AMAX_FLOOR in place of each zero (a zero range); others kept as they are."""
    return torch.where(amax == 0, torch.full_like(amax, AMAX_FLOOR), amax)


@dataclass(frozen=True)
class IntFormat:
    """Integer format of ``bits`` bits; symmetric formats have zero point 0.

    Symmetric: ``scale = amax / qmax``. Asymmetric: the range is extended to include 0,
    ``scale = (max - min) / (qmax - qmin)``, ``zero_point = round(qmin - min / scale)``.
    """

    bits: int
    signed: bool
    symmetric: bool
    block_size: ClassVar[int] = 1
    """Elements ``fake_quant`` treats together along the last axis (1: each on its own)."""
    two_level: ClassVar[bool] = False
    """Whether a tensor's scale has two levels (a global scale over block scales: NVFP4)."""
    shared_exponent: ClassVar[bool] = False
    """Whether block scales are powers of two stored as E8M0 (the MX formats)."""
    integer: ClassVar[bool] = True
    """Whether ``x / scale`` is rounded to integers (else cast to a float grid)."""

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    @property
    def weight_only(self) -> bool:
        """4-bit integers quantize weights only: activations stay in float."""
        return self.bits == 4

    @property
    def default_block_size(self) -> int | None:
        """Weight block size when a spec names none: blocks of 128 for 4 bits (the common
        deployment choice), else none."""
        return 128 if self.bits == 4 else None

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def onnx_type(self) -> int:
        types = {
            (16, True): TensorProto.INT16,
            (16, False): TensorProto.UINT16,
            (8, True): TensorProto.INT8,
            (8, False): TensorProto.UINT8,
            (4, True): TensorProto.INT4,
            (4, False): TensorProto.UINT4,
        }
        return types[(self.bits, self.signed)]

    @property
    def storage_dtype(self) -> torch.dtype:
        """Dtype of the unpacked integers; 4-bit values are packed two per byte on export."""
        if self.bits == 16:
            return torch.int16 if self.signed else torch.uint16
        return torch.int8 if self.signed else torch.uint8

    @property
    def min_opset(self) -> int:
        """QuantizeLinear/DequantizeLinear take 8-bit integers since opset 10, 4- and 16-bit
        ones since 21."""
        return 10 if self.bits == 8 else 21

    def scale_zero_point(
        self, amin: torch.Tensor, amax: torch.Tensor, scale_floor: float = SCALE_FLOOR
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 scale (at least ``scale_floor``) and zero point (integer-valued float32) for
        a range; shapes as given."""
        if self.symmetric:
            bound = floor_zero(torch.maximum(amin.abs(), amax.abs()).to(torch.float32))
            return _divide(bound, self.qmax).clamp_min(scale_floor), torch.zeros_like(bound)
        lo = amin.to(torch.float32).clamp(max=0.0)
        hi = amax.to(torch.float32).clamp(min=0.0)
        levels = self.qmax - self.qmin
        width = hi - lo
        scale = _divide(floor_zero(width), levels)
        # A width past float32's range (only for |min|, |max| near 3.4e38) is split to stay finite.
        scale = torch.where(torch.isinf(width), _divide(hi, levels) - _divide(lo, levels), scale)
        scale = scale.clamp_min(scale_floor)
        zero_point = torch.round(self.qmin - lo / scale)
        return scale, zero_point.clamp(self.qmin, self.qmax)

    def quantize(
        self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> torch.Tensor:
        """QuantizeLinear: the stored integers, as ``storage_dtype``."""
        q = torch.round(x.to(torch.float32) / scale) + zero_point
        return q.clamp(self.qmin, self.qmax).to(self.storage_dtype)

    def fake_quant(
        self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> torch.Tensor:
        """QuantizeLinear -> DequantizeLinear in float32; scale/zero_point broadcast against x."""
        return self.fake_quant_into(_out_like(x, scale), x, scale, zero_point)

    def fake_quant_into(
        self, out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> torch.Tensor:
        """``fake_quant`` written into ``out`` (float32, the broadcast shape), in place."""
        torch.div(x, scale, out=out)
        out.round_()
        if not self.symmetric:
            out.add_(zero_point)
        out.clamp_(self.qmin, self.qmax)
        if not self.symmetric:
            out.sub_(zero_point)
        return out.mul_(scale)

    def encode_zero_point(self, zero_point: torch.Tensor) -> torch.Tensor:
        return zero_point.to(self.storage_dtype)


@dataclass(frozen=True)
class FP8E4M3Format:
    """FP8 E4M3FN (no infinities, max 448): ``scale = amax / 448``, values cast with saturation."""

    name: ClassVar[str] = "fp8"
    symmetric: ClassVar[bool] = True
    block_size: ClassVar[int] = 1
    two_level: ClassVar[bool] = False
    shared_exponent: ClassVar[bool] = False
    integer: ClassVar[bool] = False
    weight_only: ClassVar[bool] = False
    default_block_size: ClassVar[int | None] = None
    qmax: ClassVar[float] = 448.0
    onnx_type: ClassVar[int] = TensorProto.FLOAT8E4M3FN
    storage_dtype: ClassVar[torch.dtype] = torch.float8_e4m3fn
    min_opset: ClassVar[int] = 19

    def scale_zero_point(
        self, amin: torch.Tensor, amax: torch.Tensor, scale_floor: float = SCALE_FLOOR
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bound = floor_zero(torch.maximum(amin.abs(), amax.abs()).to(torch.float32))
        return _divide(bound, self.qmax).clamp_min(scale_floor), torch.zeros_like(bound)

    def quantize(
        self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> torch.Tensor:
        y = x.to(torch.float32) / scale
        return y.clamp(-self.qmax, self.qmax).to(self.storage_dtype)

    def fake_quant(
        self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> torch.Tensor:
        return self.fake_quant_into(_out_like(x, scale), x, scale, zero_point)

    def fake_quant_into(
        self, out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> torch.Tensor:
        torch.div(x, scale, out=out)
        out.clamp_(-self.qmax, self.qmax)
        codes = out.to(self.storage_dtype).view(torch.uint8).int().reshape(-1)
        # Decoding through a 256-entry table, written in place, is faster than torch's
        # fp8 -> fp32 cast on CPU.
        values = _fp8_values(out.device)
        if out.is_contiguous():
            torch.index_select(values, 0, codes, out=out.view(-1))
        else:
            out.copy_(values.index_select(0, codes).view(out.shape))
        return out.mul_(scale)

    def encode_zero_point(self, zero_point: torch.Tensor) -> torch.Tensor:
        return zero_point.to(self.storage_dtype)


def _divide(t: torch.Tensor, number: float) -> torch.Tensor:
    """``t / number``, correctly rounded on every device.

    CUDA computes ``t / 127`` as ``t * (1 / 127)``, one ulp off what ONNX Runtime computes.
    """
    return t / torch.full((), number, dtype=t.dtype, device=t.device)  # made there: no copy


@functools.cache
def _fp8_values(device: torch.device) -> torch.Tensor:
    """The float32 value of each of the 256 FP8 E4M3FN codes."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    return codes.to(torch.float32).to(device)


def _out_like(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    shape = torch.broadcast_shapes(x.shape, scale.shape)
    return torch.empty(shape, dtype=torch.float32, device=x.device)


FP8_SUBNORMAL_MIN = 2.0**-9
"""Smallest positive FP8 E4M3FN value: the floor of an NVFP4 block scale."""


@dataclass(frozen=True)
class NVFP4Format:
    """NVFP4: FP4 E2M1 elements in blocks of 16, an FP8 E4M3 scale per block, an FP32 global scale.

    ``global_scale = global_amax / (6 * 448)``; block scale ``fp8(block_amax / 6 / global_scale)``
    (floored at the smallest positive FP8 value, so a zero block never divides by zero);
    value ``= e2m1(x / (block_scale * global_scale)) * block_scale * global_scale``, where the
    product of the two scales is the float32 output of the DequantizeLinear that feeds it.

    As a per-tensor format (activations, or the ``mse`` sweep of the global amax) its ``scale``
    is the global scale and the block scales are computed from each block's own amax, as the
    exported graph computes them; blocks run along the last axis of what ``fake_quant`` gets.
    """

    name: ClassVar[str] = "nvfp4"
    symmetric: ClassVar[bool] = True
    block_size: ClassVar[int] = 16
    two_level: ClassVar[bool] = True
    shared_exponent: ClassVar[bool] = False
    integer: ClassVar[bool] = False
    weight_only: ClassVar[bool] = False
    default_block_size: ClassVar[int | None] = 16
    qmax: ClassVar[float] = 6.0
    scale_min: ClassVar[float] = FP8_SUBNORMAL_MIN
    scale_max: ClassVar[float] = 448.0
    onnx_type: ClassVar[int] = TensorProto.FLOAT4E2M1
    scale_onnx_type: ClassVar[int] = TensorProto.FLOAT8E4M3FN
    storage_dtype: ClassVar[torch.dtype] = torch.uint8
    min_opset: ClassVar[int] = 23

    def global_scale(
        self, global_amax: torch.Tensor | float, scale_floor: float = SCALE_FLOOR
    ) -> torch.Tensor:
        """``global_amax / (6 * 448)``, at least ``global_floor(scale_floor)``."""
        amax = floor_zero(torch.as_tensor(global_amax, dtype=torch.float32))
        return _divide(amax, self.qmax * self.scale_max).clamp_min(self.global_floor(scale_floor))

    def global_floor(self, scale_floor: float = SCALE_FLOOR) -> float:
        """The smallest global scale: the smallest FP8 block scale times it is ``scale_floor``
        (the smallest effective scale), never 0."""
        return scale_floor / FP8_SUBNORMAL_MIN

    def block_scales(self, block_amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
        """FP8 E4M3 block scales (``float8_e4m3fn``) for float32 block amaxes."""
        raw = _divide(block_amax.to(torch.float32), self.qmax) / global_scale
        return raw.clamp(FP8_SUBNORMAL_MIN, self.scale_max).to(torch.float8_e4m3fn)

    def effective_scales(
        self, block_scales: torch.Tensor, global_scale: torch.Tensor
    ) -> torch.Tensor:
        """Float32 per-block scale: what DequantizeLinear(block scales, global scale) outputs."""
        return block_scales.to(torch.float32) * global_scale

    def round_e2m1(self, y: torch.Tensor) -> torch.Tensor:
        """Round float32 ``y`` to the E2M1 grid, half to even, saturating at ±6."""
        return round_e2m1(y)

    def fake_quant_blocks(self, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Q -> DQ of ``blocks`` (``[..., 16]``) with float32 effective scales ``[..., 1]``."""
        return self.round_e2m1(blocks.to(torch.float32) / scales) * scales

    def scale_zero_point(
        self, amin: torch.Tensor, amax: torch.Tensor, scale_floor: float = SCALE_FLOOR
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The FP32 global scale of a range, and a zero zero point."""
        bound = torch.maximum(amin.abs(), amax.abs()).to(torch.float32)
        global_scale = self.global_scale(bound, scale_floor)
        return global_scale, torch.zeros_like(global_scale)

    def fake_quant(
        self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> torch.Tensor:
        """Dynamic NVFP4 Q -> DQ: ``x`` ``[..., n]`` (n a multiple of 16), global ``scale``."""
        return self.fake_quant_into(_out_like(x, scale), x, scale, zero_point)

    def fake_quant_into(
        self, out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> torch.Tensor:
        """``fake_quant`` into ``out``; ``scale`` broadcasts against ``x`` with a last dim of 1.

        Each block's FP8 scale is computed from the block's own amax and the global scale.
        """
        size = self.block_size
        blocks = x.to(torch.float32).unflatten(-1, (-1, size))
        global_scale = scale.unsqueeze(-1)
        block_amax = blocks.abs().amax(-1, keepdim=True)
        effective = self.effective_scales(self.block_scales(block_amax, global_scale), global_scale)
        view = out.unflatten(-1, (-1, size))
        torch.div(blocks, effective, out=view)
        view.copy_(self.round_e2m1(view))
        view.mul_(effective)
        return out

    def encode_e2m1(self, values: torch.Tensor) -> torch.Tensor:
        """E2M1 codes (uint8, 0..15, bit 3 the sign) of values already on the E2M1 grid."""
        return encode_e2m1(values)

    def decode_e2m1(self, codes: torch.Tensor) -> torch.Tensor:
        """Float32 values of E2M1 codes: ``encode_e2m1``'s inverse."""
        return decode_e2m1(codes)

    def quantize(
        self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> torch.Tensor:
        """E2M1 codes (uint8) of ``x`` divided by float32 effective block ``scale`` (broadcast)."""
        return self.encode_e2m1(self.round_e2m1(x.to(torch.float32) / scale))

    def encode_zero_point(self, zero_point: torch.Tensor) -> torch.Tensor:
        return zero_point.to(torch.uint8)


NVFP4 = NVFP4Format()

Format = IntFormat | FP8E4M3Format | NVFP4Format | MXFormat

INT8 = IntFormat(bits=8, signed=True, symmetric=True)
UINT8 = IntFormat(bits=8, signed=False, symmetric=False)
INT16 = IntFormat(bits=16, signed=True, symmetric=True)
UINT16 = IntFormat(bits=16, signed=False, symmetric=False)
INT4 = IntFormat(bits=4, signed=True, symmetric=True)
UINT4 = IntFormat(bits=4, signed=False, symmetric=False)
FP8_E4M3 = FP8E4M3Format()

FORMATS: dict[str, Format] = {
    f.name: f for f in (INT8, UINT8, INT16, UINT16, INT4, UINT4, FP8_E4M3, NVFP4, MXFP8, MXFP4)
}


def get_format(name: str) -> Format:
    """The format called ``name`` (see FORMATS); RecipeError lists the choices otherwise."""
    from qcal_export.errors import RecipeError

    try:
        return FORMATS[name]
    except KeyError:
        raise RecipeError(f"unknown format {name!r}: choose one of {sorted(FORMATS)}") from None


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8 or int8 values) packed two per byte along the flattened tensor.

    Element ``2i`` goes in the low nibble of byte ``i`` (ONNX INT4/UINT4/FLOAT4E2M1 and the
    serving checkpoints agree); an odd count gets a zero high nibble in the last byte.
    """
    flat = codes.reshape(-1).to(torch.uint8) & 0x0F
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The inverse of ``pack_nibbles``: ``count`` 4-bit codes (uint8) in order."""
    flat = packed.reshape(-1).to(torch.uint8)
    return torch.stack([flat & 0x0F, flat >> 4], dim=-1).reshape(-1)[:count]

"""The float ops an FP4 emulation is built of: a block scale repeated over its block, E2M1
rounding half to even by magnitude range with saturation, and the Q -> DQ round trip, in ONNX
ops ONNX Runtime runs (opset 18 or later), for any float type and dynamic shapes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcal_export.graphs.qdq import Names
from qcal_export.spec.e2m1 import E2M1_VALUES

E2M1_STEPS = ((2.0, 0.5), (4.0, 1.0))
"""(magnitude bound, grid spacing below it) of E2M1; 2.0 up to the largest value, 6. Dividing
by a power-of-two spacing, rounding half to even and multiplying back is exact (as
``NVFP4Format.round_e2m1`` computes it)."""

E2M1_MAX, E2M1_WIDE_STEP = E2M1_VALUES[-1], 2.0


class Builder:
    """Appends nodes and constants named after one tensor; ``node`` returns the output name."""

    def __init__(self, graph: onnx.GraphProto, names: Names, tensor: str):
        self.graph, self.names, self.tensor = graph, names, tensor
        self.nodes: list[onnx.NodeProto] = []

    def const(self, base: str, values: np.ndarray) -> str:
        name = self.names.new(f"{self.tensor}_{base}")
        self.graph.initializer.append(numpy_helper.from_array(values, name))
        return name

    def ints(self, base: str, values: list[int]) -> str:
        return self.const(base, np.array(values, np.int64))

    def node(
        self, op: str, inputs: list[str], base: str, output: str | None = None, **attributes: int
    ) -> str:
        out = output or self.names.new(f"{self.tensor}_{base}")
        name = self.names.new(f"{self.tensor}_emulated_{op}")
        self.nodes.append(helper.make_node(op, inputs, [out], name, **attributes))
        return out


def block_expanded(b: Builder, x: str, scale: str, axis: int, size: int) -> str:
    """``scale`` repeated over each block of ``size`` along ``axis`` of ``x``, cut to its
    length (``Gather`` of block ``i // size`` for each index ``i``); per tensor (``size`` 0):
    ``scale`` as it is."""
    if not size:
        return scale
    shape = b.node("Shape", [x], "shape")
    length = b.node("Gather", [shape, b.const("axis", np.array(axis, np.int64))], "length")
    one = b.const("one", np.array(1, np.int64))
    index = b.node("Range", [b.const("zero", np.array(0, np.int64)), length, one], "index")
    block = b.node("Div", [index, b.const("block_size", np.array(size, np.int64))], "block")
    return b.node("Gather", [scale, block], "expanded_scale", axis=axis)


def round_trip(b: Builder, x: str, scale: str, output: str) -> None:
    """``output = round_e2m1(x / scale) * scale`` in ``x``'s type, the rounding in float32
    (exact: E2M1 values are representable in every float type)."""
    y = b.node("Div", [x, scale], "scaled")
    y32 = b.node("Cast", [y], "scaled_float", to=TensorProto.FLOAT)
    rounded = round_e2m1(b, y32)
    back = b.node("CastLike", [rounded, x], "rounded_like")
    b.node("Mul", [back, scale], "emulated", output)


def round_e2m1(b: Builder, y: str) -> str:
    """Float32 ``y`` to the E2M1 grid: clipped to ±6, divided by the grid spacing of its
    magnitude, rounded half to even, multiplied back."""
    f32 = np.float32
    clipped = b.node(
        "Clip", [y, b.const("low", f32(-E2M1_MAX)), b.const("high", f32(E2M1_MAX))], "clipped"
    )
    magnitude = b.node("Abs", [clipped], "magnitude")
    step = b.const("wide_step", f32(E2M1_WIDE_STEP))
    for bound, spacing in reversed(E2M1_STEPS):
        below = b.node("Less", [magnitude, b.const("bound", f32(bound))], "below")
        step = b.node("Where", [below, b.const("spacing", f32(spacing)), step], "step")
    units = b.node("Round", [b.node("Div", [clipped, step], "units")], "rounded_units")
    return b.node("Mul", [units, step], "rounded")


def round_e4m3(b: Builder, y: str) -> str:
    """Float32 ``y`` to the FP8 E4M3FN grid, half to even, saturating at ±448: a saturating
    Cast there and back, which ONNX Runtime computes as the reference QuantizeLinear does."""
    fp8 = b.node("Cast", [y], "e4m3", to=TensorProto.FLOAT8E4M3FN, saturate=1)
    return b.node("Cast", [fp8], "rounded", to=TensorProto.FLOAT)


ELEMENT_ROUNDING = {TensorProto.FLOAT4E2M1: round_e2m1, TensorProto.FLOAT8E4M3FN: round_e4m3}
"""Float32 rounding onto each element type of an emulated Q -> DQ pair, in ORT's ops."""

"""MX activations' Q -> DQ pairs as float ops ONNX Runtime runs, for the FP4/MX emulation.

The graph computes their FLOAT8E8M0 block scales with Casts (graphs/mx.py), which ORT runs; it
has no QuantizeLinear/DequantizeLinear kernel for an E8M0 scale. Here each such pair becomes:
the scale cast to float32 (exact: a power of two) and repeated over its block, ``x / scale`` in
float32 (the pair's ``precision``), rounded onto the element grid (E2M1 or E4M3, saturating),
``* scale`` and cast to the DequantizeLinear's output type, as the reference evaluator computes
it. A Cast to E8M0 rounding otherwise than down is left to the evaluator: ORT's reads float32
subnormals differently there.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from qcal_export.graphs.fp4_ops import ELEMENT_ROUNDING, Builder, block_expanded

E8M0 = TensorProto.FLOAT8E8M0


def e8m0_tensors(graph: onnx.GraphProto) -> set[str]:
    """The outputs of ``graph``'s Casts to FLOAT8E8M0 (block scales the graph computes)."""
    return {
        node.output[0]
        for node in graph.node
        if node.op_type == "Cast" and not node.domain and attribute(node, "to", None) == E8M0
    }


def e8m0_unexpressed(graph: onnx.GraphProto) -> list[str]:
    """Nodes ORT cannot run as the reference evaluator does: Q/DQ reading a computed E8M0
    scale, and Casts to E8M0 that do not round down."""
    scales = e8m0_tensors(graph)
    left = []
    for node in graph.node:
        if node.domain:
            continue
        quantizer = node.op_type in ("QuantizeLinear", "DequantizeLinear")
        if quantizer and len(node.input) > 1 and node.input[1] in scales:
            left.append(f"{node.op_type} node {node.name!r} (an E8M0 scale)")
        elif node.output and node.output[0] in scales and _round_mode(node) != "down":
            left.append(f"Cast node {node.name!r} (to E8M0, rounding {_round_mode(node)})")
    return left


def is_e8m0_pair(quantize: onnx.NodeProto, scales: set[str]) -> bool:
    """Whether ``quantize`` (a QuantizeLinear without zero point) reads a computed E8M0 scale,
    divides in float32 and writes an element type the emulation rounds onto."""
    element = attribute(quantize, "output_dtype", 0)
    precision = attribute(quantize, "precision", 0)
    float32 = precision in (0, TensorProto.FLOAT)
    return quantize.input[1] in scales and element in ELEMENT_ROUNDING and float32


def e8m0_round_trip(b: Builder, quantize: onnx.NodeProto, dequantize: onnx.NodeProto) -> None:
    """The float ops of ``dequantize(quantize(x, scale), scale)``, written to ``dequantize``'s
    output: ``cast(round(float32(x) / s) * s)`` with ``s`` the scale over its blocks."""
    x, scale = quantize.input[0], quantize.input[1]
    value = b.node("Cast", [scale], "scale_value", to=TensorProto.FLOAT)
    axis, size = attribute(quantize, "axis", 1), attribute(quantize, "block_size", 0)
    expanded = block_expanded(b, x, value, axis, size)
    x32 = b.node("Cast", [x], "float", to=TensorProto.FLOAT)
    y = b.node("Div", [x32, expanded], "scaled")
    rounded = ELEMENT_ROUNDING[attribute(quantize, "output_dtype", 0)](b, y)
    product = b.node("Mul", [rounded, expanded], "product")
    out_type = attribute(dequantize, "output_dtype", 0) or TensorProto.FLOAT
    b.node("Cast", [product], "emulated", dequantize.output[0], to=out_type)


def _round_mode(node: onnx.NodeProto) -> str:
    mode = attribute(node, "round_mode", "up")
    return mode.decode() if isinstance(mode, bytes) else mode


def attribute(node: onnx.NodeProto, name: str, default):
    """A node's attribute value, or ``default``."""
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)

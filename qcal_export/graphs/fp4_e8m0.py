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

import numpy as np
import onnx
from onnx import TensorProto, helper

from qcal_export.graphs.fp4_ops import ELEMENT_ROUNDING, Builder, block_expanded
from qcal_export.graphs.qdq import Names

E8M0, FLOAT = TensorProto.FLOAT8E8M0, TensorProto.FLOAT


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


def nan_propagating_amaxes(graph: onnx.GraphProto, names: Names) -> int:
    """Each ReduceMax whose block amax feeds a Cast to E8M0 followed by a Where that gives NaN
    for a block holding NaN, as the reference evaluator's (numpy's) max does and ORT's, which
    skips NaN, does not: the block's scale and so all its values are then NaN in both."""
    nodes, count = [], 0
    amaxes = _e8m0_amaxes(graph)
    for node in graph.node:
        nodes.append(node)
        if node.name not in amaxes:
            continue
        b = Builder(graph, names, node.output[0])
        flag = b.node("Cast", [b.node("IsNaN", [node.input[0]], "isnan")], "nan", to=FLOAT)
        any_nan = helper.make_node(
            "ReduceMax", [flag, *node.input[1:]], [names.new(f"{flag}_any")], names.new(flag)
        )
        any_nan.attribute.extend(node.attribute)
        found = b.node("Greater", [any_nan.output[0], b.const("zero", np.float32(0))], "found")
        amax = names.new(f"{node.output[0]}_skipping_nan")
        nan = b.node("CastLike", [b.const("nan", np.float32(np.nan)), amax], "nan_like")
        b.node("Where", [found, nan, amax], "with_nan", node.output[0])
        node.output[0] = amax
        nodes.extend([*b.nodes[:2], any_nan, *b.nodes[2:]])
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def _e8m0_amaxes(graph: onnx.GraphProto) -> set[str]:
    """Names of the ReduceMax nodes whose output reaches a Cast to E8M0 through Casts, Adds
    and Muls (their first inputs): the block amaxes of graphs/mx.py's scales."""
    producers = {out: node for node in graph.node for out in node.output}
    found = set()
    for name in e8m0_tensors(graph):
        node = producers[name]
        for _ in range(_CHAIN_DEPTH):
            node = producers.get(node.input[0]) if node.input else None
            if node is None or node.domain or node.op_type not in ("Cast", "Add", "Mul"):
                break
        if node is not None and node.op_type == "ReduceMax" and not node.domain:
            found.add(node.name)
    return found


_CHAIN_DEPTH = 8
"""How far back from a Cast to E8M0 its block amax's ReduceMax is looked for."""

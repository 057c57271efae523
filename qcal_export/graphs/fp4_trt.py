"""The TensorRT form's FP4 activation ops (graphs/nvfp4.py) rewritten as standard float ops.

``trt::TRT_FP4DynamicQuantize(x, global_scale)`` (blocks of 16 along the last axis) becomes the
FP8 block scales as TensorRT defines them and the portable form computes them (block amax,
``/ 6 / global_scale``, clipped, QuantizeLinear to FP8); the ``trt::DequantizeLinear`` of those
scales the standard one; the ``trt::DequantizeLinear`` of the FP4 values the float round trip
of ``x`` (fp4_ops.round_trip). No rank or static length is needed: the last axis is padded
to whole blocks by a Pad over that axis alone.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from qcal_export.graphs.fp4_ops import Builder, block_expanded, round_trip
from qcal_export.graphs.nvfp4 import TRT_DOMAIN, TRT_DYNAMIC_QUANTIZE
from qcal_export.graphs.qdq import Names
from qcal_export.spec.formats import FP8_SUBNORMAL_MIN, NVFP4


def emulate_trt(graph: onnx.GraphProto) -> int:
    """Rewrite each TRT_FP4DynamicQuantize along the last axis with a per-tensor initializer
    global scale, and the trt::DequantizeLinear nodes of its outputs, in place; returns how
    many FP4 activations were rewritten."""
    float_types = {t.name: t.data_type for t in graph.initializer if not t.dims}
    quantizers = {
        node.output[0]: node
        for node in graph.node
        if _is_trt(node, TRT_DYNAMIC_QUANTIZE)
        and _attribute(node, "axis", -1) == -1
        and node.input[1] in float_types
    }
    scales = {node.output[1]: node for node in quantizers.values()}
    names = Names(graph)
    nodes, count = [], 0
    for node in graph.node:
        if node.output[0] in quantizers:
            nodes.extend(_block_scales(graph, names, node, float_types[node.input[1]]))
        elif _is_trt(node, "DequantizeLinear") and node.input[0] in scales:
            nodes.append(helper.make_node("DequantizeLinear", node.input, node.output, node.name))
        elif _is_trt(node, "DequantizeLinear") and node.input[0] in quantizers:
            x = quantizers[node.input[0]].input[0]
            b = Builder(graph, names, node.output[0])
            size = _attribute(node, "block_size", 0)
            expanded = block_expanded(b, x, node.input[1], _attribute(node, "axis", 1), size)
            round_trip(b, x, expanded, node.output[0])
            nodes.extend(b.nodes)
            count += 1
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def _block_scales(
    graph: onnx.GraphProto, names: Names, node: onnx.NodeProto, float_type: int
) -> list[onnx.NodeProto]:
    """The FP8 block scales of the quantize ``node``'s input, under its second output's name:
    ``fp8(clip(block_amax / 6 / global_scale, smallest FP8, 448))``, blocks along the last
    axis, a partial last block padded with zeros (which change no amax)."""
    x, global_scale = node.input[0], node.input[1]
    size = _attribute(node, "block_size", NVFP4.block_size)
    dtype = helper.tensor_dtype_to_np_dtype(float_type)
    b = Builder(graph, names, node.output[1])
    magnitude = b.node("Abs", [x], "abs")
    length = b.node("Shape", [magnitude], "length", start=-1)
    block = b.ints("block_size", [size])
    short = b.node("Sub", [block, b.node("Mod", [length, block], "remainder")], "short")
    pad = b.node("Mod", [short, block], "pad")
    pads = b.node("Concat", [b.ints("no_pad", [0]), pad], "pads", axis=0)
    last = b.ints("last_axis", [-1])
    padded = b.node("Pad", [magnitude, pads, "", last], "padded")
    head = b.node("Shape", [padded], "head_shape", end=-1)
    shape = b.node("Concat", [head, b.ints("block_dims", [-1, size])], "block_shape", axis=0)
    grouped = b.node("Reshape", [padded, shape], "blocks")
    amax = b.node("ReduceMax", [grouped, last], "block_amax", keepdims=0)
    raw = b.node("Div", [amax, b.const("qmax", dtype.type(NVFP4.qmax))], "block_amax_per_qmax")
    raw = b.node("Div", [raw, global_scale], "raw_block_scale")
    low = b.const("scale_min", dtype.type(FP8_SUBNORMAL_MIN))
    high = b.const("scale_max", dtype.type(NVFP4.scale_max))
    clipped = b.node("Clip", [raw, low, high], "clipped_block_scale")
    unit = b.const("unit_scale", dtype.type(1.0))
    fp8 = TensorProto.FLOAT8E4M3FN
    b.node("QuantizeLinear", [clipped, unit], "", node.output[1], output_dtype=fp8)
    return b.nodes


def _is_trt(node: onnx.NodeProto, op_type: str) -> bool:
    return node.domain == TRT_DOMAIN and node.op_type == op_type


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)

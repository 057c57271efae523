"""An ONNX Runtime-runnable copy of an FP4 QDQ model that computes exactly the same values.

ORT has no FLOAT4E2M1 kernels. Here each weight DequantizeLinear chain of FP4 codes becomes
its dequantized float initializer (graphs/fp4_weights.py), and each activation
``QuantizeLinear -> DequantizeLinear`` to FLOAT4E2M1 becomes standard float ops: ``x / scale``
(the scale repeated over its block, a partial last block and dynamic shapes included), E2M1
rounding half to even by magnitude range, saturating at 6, and ``* scale``. The block scales
stay as the graph computes them (QuantizeLinear to FP8 and back, which ORT runs). What the
emulation cannot express (TensorRT's ops, FP4 elsewhere) is left as it is:
``Emulation.unexpressed`` names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from qcal_export.graphs.fp4_weights import ELEMENT_FORMATS, fold_weights
from qcal_export.graphs.nvfp4 import TRT_DOMAIN
from qcal_export.graphs.qdq import Names
from qcal_export.onnx_io.weights import store_embedded
from qcal_export.spec.formats import E2M1_VALUES

E2M1_STEPS = ((2.0, 0.5), (4.0, 1.0))
"""(magnitude bound, grid spacing below it) of E2M1; 2.0 up to the largest value, 6. Dividing
by a power-of-two spacing, rounding half to even and multiplying back is exact (as
``NVFP4Format.round_e2m1`` computes it)."""

E2M1_MAX, E2M1_WIDE_STEP = E2M1_VALUES[-1], 2.0


@dataclass
class Emulation:
    """The emulated model, and what in it ORT still cannot run (empty: all of it runs)."""

    model: onnx.ModelProto
    folded_weights: int = 0
    emulated_activations: int = 0
    unexpressed: list[str] = field(default_factory=list)


def emulate_fp4(model: onnx.ModelProto) -> Emulation:
    """A copy of ``model`` with its FP4 weight chains folded and FP4 activation Q -> DQ pairs
    replaced by float ops; ``model`` itself is not changed. Large folded weights go into the
    weight store of ``model``'s stored initializers, where it has one."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    folded = fold_weights(graph)
    _replace_by_initializers(graph, folded)
    emulated = _emulate_activations(graph)
    prune(graph)
    store_embedded(copy)
    return Emulation(copy, len(folded), emulated, unexpressed(graph))


def runnable_form(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` itself where ONNX Runtime can run it, else its FP4 emulation where that
    expresses all of it, else None (TensorRT's ops): for any pass that runs an exported model
    in ORT, such as a switchable form built over it."""
    if not unexpressed(model.graph):
        return model
    emulation = emulate_fp4(model)
    return None if emulation.unexpressed else emulation.model


def unexpressed(graph: onnx.GraphProto) -> list[str]:
    """Initializers and nodes of ``graph`` that ORT cannot run: an FP4 type or TensorRT's op."""
    left = [f"initializer {t.name!r}" for t in graph.initializer if t.data_type in ELEMENT_FORMATS]
    for node in graph.node:
        if node.domain == TRT_DOMAIN:
            left.append(f"{node.domain}::{node.op_type} node {node.name!r}")
        elif _output_dtype(node) in ELEMENT_FORMATS:
            left.append(f"{node.op_type} node {node.name!r}")
    return left


def _replace_by_initializers(graph: onnx.GraphProto, values: dict[str, torch.Tensor]) -> None:
    """Drop the nodes writing ``values``' names and add those values as initializers."""
    if not values:
        return
    kept = [node for node in graph.node if node.output[0] not in values]
    del graph.node[:]
    graph.node.extend(kept)
    for name, tensor in values.items():
        graph.initializer.append(numpy_helper.from_array(_numpy(tensor), name))


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A torch tensor as numpy (bfloat16 through ml_dtypes' type, which numpy_helper writes)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy().view(helper.tensor_dtype_to_np_dtype(16))
    return tensor.numpy()


def _output_dtype(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "output_dtype"), None)


def _emulate_activations(graph: onnx.GraphProto) -> int:
    """Each DequantizeLinear of a dynamic FP4 QuantizeLinear (same scale and blocks, no zero
    point) replaced in place by float ops; returns how many were."""
    producers = {out: node for node in graph.node for out in node.output}
    names = Names(graph)
    nodes, count = [], 0
    for node in graph.node:
        quantize = _fp4_source(node, producers)
        if quantize is None:
            nodes.append(node)
            continue
        builder = _Builder(graph, names, node.output[0])
        scale = _block_expanded(builder, quantize)
        _round_trip(builder, quantize.input[0], scale, node.output[0])
        nodes.extend(builder.nodes)
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def _fp4_source(
    node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]
) -> onnx.NodeProto | None:
    """The FP4 QuantizeLinear a DequantizeLinear ``node`` reverses, where the emulation can
    express the pair: same scale input, axis and block size, no zero point."""
    if node.op_type != "DequantizeLinear" or node.domain or len(node.input) != 2:
        return None
    quantize = producers.get(node.input[0])
    if quantize is None or quantize.op_type != "QuantizeLinear" or quantize.domain:
        return None
    if _output_dtype(quantize) not in ELEMENT_FORMATS or len(quantize.input) != 2:
        return None
    same = quantize.input[1] == node.input[1] and _blocks(quantize) == _blocks(node)
    return quantize if same else None


def _blocks(node: onnx.NodeProto) -> tuple[int, int]:
    attributes = {a.name: a.i for a in node.attribute}
    return attributes.get("axis", 1), attributes.get("block_size", 0)


class _Builder:
    """Appends nodes and constants named after one tensor; ``node`` returns the output name."""

    def __init__(self, graph: onnx.GraphProto, names: Names, tensor: str):
        self.graph, self.names, self.tensor = graph, names, tensor
        self.nodes: list[onnx.NodeProto] = []

    def const(self, base: str, values: np.ndarray) -> str:
        name = self.names.new(f"{self.tensor}_{base}")
        self.graph.initializer.append(numpy_helper.from_array(values, name))
        return name

    def node(
        self, op: str, inputs: list[str], base: str, output: str | None = None, **attributes: int
    ) -> str:
        out = output or self.names.new(f"{self.tensor}_{base}")
        name = self.names.new(f"{self.tensor}_emulated_{op}")
        self.nodes.append(helper.make_node(op, inputs, [out], name, **attributes))
        return out


def _block_expanded(b: _Builder, quantize: onnx.NodeProto) -> str:
    """The Q node's scale repeated over each block along its axis, cut to the input's length
    (``Gather`` of block ``i // block_size`` for each index ``i``); per tensor: as it is."""
    axis, size = _blocks(quantize)
    x, scale = quantize.input[0], quantize.input[1]
    if not size:
        return scale
    shape = b.node("Shape", [x], "shape")
    length = b.node("Gather", [shape, b.const("axis", np.array(axis, np.int64))], "length")
    one = b.const("one", np.array(1, np.int64))
    index = b.node("Range", [b.const("zero", np.array(0, np.int64)), length, one], "index")
    block = b.node("Div", [index, b.const("block_size", np.array(size, np.int64))], "block")
    return b.node("Gather", [scale, block], "expanded_scale", axis=axis)


def _round_trip(b: _Builder, x: str, scale: str, output: str) -> None:
    """``output = round_e2m1(x / scale) * scale`` in ``x``'s type, the rounding in float32
    (exact: E2M1 values are representable in every float type)."""
    y = b.node("Div", [x, scale], "scaled")
    y32 = b.node("Cast", [y], "scaled_float", to=TensorProto.FLOAT)
    rounded = _round_e2m1(b, y32)
    back = b.node("CastLike", [rounded, x], "rounded_like")
    b.node("Mul", [back, scale], "emulated", output)


def _round_e2m1(b: _Builder, y: str) -> str:
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


def prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes and initializers no graph output depends on (subgraphs' reads kept)."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output if out) or _has_subgraph(node):
            kept.append(node)
            needed |= set(node.input)
            needed |= _subgraph_reads(node)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.HasField("g") or len(a.graphs) for a in node.attribute)


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    reads: set[str] = set()
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else attr.graphs:
            for inner in sub.node:
                reads |= set(inner.input) | _subgraph_reads(inner)
    return reads

"""The float model with chosen activations' Q -> DQ behind gates that cost nothing when shut.

For method ``auto``'s scoring, which runs the model once per activation and candidate with that
activation alone quantized. Each gated activation's QuantizeLinear -> DequantizeLinear pair (and
the pairs of the tensors that share its scale through data movement) moves into the then-branch
of an ``If`` whose condition is the activation's entry of the bool graph input ``GATE``; the
else-branch passes the float tensor on. Unlike the switchable model's ``Where`` (both sides
computed on every run, weights dequantized each time), a run computes only the pair it opens,
and the weights stay float initializers. The gates still cut the graph where ONNX Runtime would
fuse ops, so a run costs more than the float model's.

Each gated activation's scale and zero point initializers are graph inputs too (the
initializers are their defaults), so that a run may feed a candidate's values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcal_export.graphs.qdq import Names
from qcal_export.spec.plan import Plan

GATE = "qcal_gate"
"""The gates' graph input: bool ``[len(tensors)]``, True where an activation runs quantized."""


@dataclass
class Gated:
    """The gated model, its activations in the order of ``GATE``, and per activation the
    (scale, zero point or None) graph inputs its Q -> DQ pairs read."""

    model: onnx.ModelProto
    tensors: list[str]
    scales: dict[str, tuple[str, str | None]] = field(default_factory=dict)


def gate_activations(exported: onnx.ModelProto, plan: Plan) -> Gated:
    """``exported`` (the QDQ form of ``plan``, which quantizes activations only; edited in
    place) with one gate per planned activation over its Q -> DQ pair and its sharers'."""
    graph = exported.graph
    names = Names(graph)
    tensors = list(plan.activations)
    entries = {**plan.activations, **plan.shared}
    quantizers = {
        node.output[0]: node
        for node in graph.node
        if node.op_type == "QuantizeLinear" and node.input[0] in entries
    }
    gated = Gated(exported, tensors)
    kept = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in quantizers:
            if node.output[0] not in quantizers:
                kept.append(node)
            continue
        quantize = quantizers[node.input[0]]
        source = quantize.input[0]
        index = tensors.index(plan.root(source))
        kept += _gate(quantize, node, index, names, entries[source].elem_type)
        if source in plan.activations:
            zero_point = quantize.input[2] if len(quantize.input) > 2 else ""
            gated.scales[source] = (quantize.input[1], zero_point or None)
    del graph.node[:]
    graph.node.extend(kept)
    graph.input.append(helper.make_tensor_value_info(GATE, TensorProto.BOOL, [len(tensors)]))
    _declare_inputs(graph, {n for pair in gated.scales.values() for n in pair if n})
    return gated


def _gate(
    quantize: onnx.NodeProto, dequantize: onnx.NodeProto, index: int, names: Names, elem: int
) -> list[onnx.NodeProto]:
    """The Gather of the gate's flag and the If that runs ``quantize`` -> ``dequantize`` where
    it is set, else passes their input on."""
    source, out = quantize.input[0], dequantize.output[0]
    flag = names.new(f"{source}/{GATE}")
    position = numpy_helper.from_array(np.array(index, dtype=np.int64), names.new(flag + "_index"))
    inner = names.new(f"{out}/quantized")
    dequantize.output[0] = inner
    then_branch = helper.make_graph(
        [quantize, dequantize],
        flag + "_then",
        [],
        [helper.make_tensor_value_info(inner, elem, None)],
    )
    passed = names.new(f"{out}/float")
    else_branch = helper.make_graph(
        [helper.make_node("Identity", [source], [passed])],
        flag + "_else",
        [],
        [helper.make_tensor_value_info(passed, elem, None)],
    )
    return [
        helper.make_node("Constant", [], [position.name], value=position),
        helper.make_node("Gather", [GATE, position.name], [flag], axis=0),
        helper.make_node(
            "If",
            [flag],
            [out],
            name=names.new(flag + "_if"),
            then_branch=then_branch,
            else_branch=else_branch,
        ),
    ]


def _declare_inputs(graph: onnx.GraphProto, wanted: set[str]) -> None:
    """Declare the initializers ``wanted`` as graph inputs too (their values the defaults)."""
    for init in graph.initializer:
        if init.name in wanted:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, init.dims))

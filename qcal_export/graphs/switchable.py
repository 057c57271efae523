"""One QDQ model whose quantized nodes can each be switched back to float at run time.

For the per-layer view and the precision search. Every input of a planned node that the export
rewired to a quantized value becomes ``Where(enable[i], quantized, float)``, where ``enable`` is
a bool graph input with one entry per node; the float source stays in the graph (a weight's
float initializer is put back beside its quantized form). One ONNX Runtime session then runs
any mix of float and quantized nodes: all off is the float model, all on the exported one
(computed in float: the switches keep ORT from fusing the Q/DQ pairs into integer kernels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcal_export.graphs.qdq import Names, sort_nodes
from qcal_export.spec.plan import Plan

ENABLE = "qcal_enable"
"""The switches' graph input: bool ``[len(nodes)]``, True where a node runs quantized."""


@dataclass
class Switchable:
    """The switchable model, its nodes in the order of ``enable``, and per quantized activation
    the (float, quantized) tensors that its SQNR compares."""

    model: onnx.ModelProto
    nodes: list[str]
    probes: dict[str, tuple[str, str]] = field(default_factory=dict)
    scales: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Per quantized activation, its (scale, zero point) initializers, also graph inputs: a run
    may feed other values in their place."""


def planned_inputs(plan: Plan) -> dict[str, list[tuple[int, str, str]]]:
    """Per planned node, its quantized inputs: (input index, float tensor, kind)."""
    inputs: dict[str, list[tuple[int, str, str]]] = {}
    for kind, plans in (("activation", plan.activations), ("weight", plan.weights)):
        for tensor, planned in plans.items():
            for use in planned.uses:
                inputs.setdefault(use.node, []).append((use.index, tensor, kind))
    return inputs


def switchable_model(
    original: onnx.ModelProto, exported: onnx.ModelProto, plan: Plan
) -> Switchable:
    """``exported`` (the QDQ form of ``original`` under ``plan``; edited in place) with a
    switch on every quantized input of every planned node."""
    graph = exported.graph
    floats = {t.name: t for t in original.graph.initializer}
    present = {t.name for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    names = Names(graph)
    inputs = planned_inputs(plan)
    order = [name for name in plan.nodes if name in inputs]
    switched = Switchable(exported, order)
    added = []
    for position, name in enumerate(order):
        node = nodes[name]
        flag = names.new(f"{name}/{ENABLE}")
        index = numpy_helper.from_array(np.array(position, dtype=np.int64), names.new(flag + "_i"))
        graph.initializer.append(index)
        added.append(helper.make_node("Gather", [ENABLE, index.name], [flag], name=flag, axis=0))
        for slot, tensor, kind in inputs[name]:
            quantized = node.input[slot]
            if kind == "weight" and tensor not in present:
                graph.initializer.append(floats[tensor])
                present.add(tensor)
            if kind == "activation":
                switched.probes[tensor] = (tensor, quantized)
            out = names.new(f"{tensor}/switched")
            added.append(helper.make_node("Where", [flag, quantized, tensor], [out], name=out))
            node.input[slot] = out
    graph.node.extend(added)
    graph.input.append(helper.make_tensor_value_info(ENABLE, TensorProto.BOOL, [len(order)]))
    switched.scales = _overridable_scales(graph, set(plan.activations))
    sort_nodes(graph)
    return switched


def _overridable_scales(graph: onnx.GraphProto, tensors: set[str]) -> dict[str, tuple[str, str]]:
    """The (scale, zero point) initializers of each activation's QuantizeLinear, declared as
    graph inputs too (an initializer that is also an input is a default a run may replace)."""
    inits = {t.name: t for t in graph.initializer}
    found = {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in tensors:
            scale, zero_point = node.input[1], node.input[2]
            found[node.input[0]] = (scale, zero_point)
            for name in (scale, zero_point):
                init = inits[name]
                graph.input.append(
                    helper.make_tensor_value_info(name, init.data_type, list(init.dims))
                )
    return found

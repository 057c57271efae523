"""The float model with chosen activations' quantization behind gates that cost nothing when shut.

For method ``auto``'s scoring, which runs the model once per activation and candidate with that
activation alone quantized. Each gated activation's region (the nodes between it and the tensor
its planned consumers read: a QuantizeLinear -> DequantizeLinear pair, or NVFP4's block-amax
chain and FP4 round trip as the emulation computes them), and the regions of the tensors that
share its scale through data movement, move into the then-branch of an ``If`` whose condition
is the activation's entry of the bool graph input ``GATE``; the else-branch passes the float
tensor on. Unlike the switchable model's ``Where`` (both sides computed on every run, weights
dequantized each time), a run computes only the region it opens, and the weights stay float
initializers. The gates still cut the graph where ONNX Runtime would fuse ops, so a run costs
more than the float model's.

The initializers holding each gated activation's calibrated values (the export's
``activation_params``) are graph inputs too (the initializers are their defaults), so that a
run may feed a candidate's values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcal_export.errors import RecipeError
from qcal_export.graphs.qdq import Names
from qcal_export.graphs.suffix import node_reads
from qcal_export.spec.plan import ActivationPlan, Plan, SharedActivation

GATE = "qcal_gate"
"""The gates' graph input: bool ``[len(tensors)]``, True where an activation runs quantized."""


@dataclass
class Gated:
    """The gated model, its activations in the order of ``GATE``, and per activation the
    graph inputs holding its calibrated values (scale and zero point, or a global scale)."""

    model: onnx.ModelProto
    tensors: list[str]
    scales: dict[str, list[str]] = field(default_factory=dict)


def gate_activations(
    exported: onnx.ModelProto, plan: Plan, params: Mapping[str, list[str]]
) -> Gated:
    """``exported`` (the quantized form of ``plan``, which quantizes activations only, in a
    form ONNX Runtime runs; edited in place) with one gate per planned activation over its
    region and its sharers'. ``params``: the export's ``activation_params``."""
    graph = exported.graph
    names = Names(graph)
    tensors = list(plan.activations)
    entries: dict[str, ActivationPlan | SharedActivation] = {**plan.activations, **plan.shared}
    nodes = list(graph.node)
    reads = [node_reads(node) for node in nodes]
    outputs = {o.name for o in graph.output}
    regions = {
        source: _region(nodes, reads, outputs, entry, names) for source, entry in entries.items()
    }
    owner = {i: source for source, (region, _) in regions.items() for i in region}
    last = {max(region): source for source, (region, _) in regions.items()}
    kept = []
    for i, node in enumerate(nodes):
        if i in last:
            source = last[i]
            region, out = regions[source]
            index = tensors.index(plan.root(source))
            inner = [nodes[k] for k in sorted(region)]
            kept += _gate(source, inner, out, index, names, entries[source].elem_type)
        elif i not in owner:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    graph.input.append(helper.make_tensor_value_info(GATE, TensorProto.BOOL, [len(tensors)]))
    gated = Gated(exported, tensors, {t: list(params.get(t, [])) for t in tensors})
    _declare_inputs(graph, {n for held in gated.scales.values() for n in held})
    return gated


def _region(
    nodes: list[onnx.NodeProto],
    reads: list[set[str]],
    outputs: set[str],
    entry: ActivationPlan | SharedActivation,
    names: Names,
) -> tuple[set[int], str]:
    """The indices in ``nodes`` (each reading ``reads``) of the nodes that descend from
    ``entry``'s tensor and lead to the tensor its planned uses read now, and that tensor;
    RecipeError where a tensor computed in between is read outside the region or is one of the
    graph ``outputs`` (it could not move behind a gate)."""
    source = entry.tensor
    out = {names.node(use.node).input[use.index] for use in entry.uses}
    if len(out) != 1 or source in out:
        raise RecipeError(
            f"method auto cannot gate activation {source!r}: its planned consumers do not read "
            "one quantized form of it"
        )
    (out,) = out
    reached, descends = {source}, set()
    for i, node in enumerate(nodes):
        if reads[i] & reached:
            descends.add(i)
            reached |= set(node.output)
    needed, region = {out}, set()
    for i in range(len(nodes) - 1, -1, -1):
        if set(nodes[i].output) & needed:
            needed |= reads[i]
            if i in descends:
                region.add(i)
    inside = {o for i in region for o in nodes[i].output if o} - {out}
    read = next((n for i, n in enumerate(nodes) if i not in region and reads[i] & inside), None)
    leaked = inside & outputs
    if read is not None or leaked:
        what = f"node {read.name!r}" if read is not None else "a graph output"
        raise RecipeError(
            f"method auto cannot gate activation {source!r}: {what} reads a tensor computed "
            "between it and its quantized form"
        )
    return region, out


def _gate(
    source: str,
    region: list[onnx.NodeProto],
    out: str,
    index: int,
    names: Names,
    elem: int,
) -> list[onnx.NodeProto]:
    """The Gather of the gate's flag and the If that runs ``region`` (which computes ``out``
    from ``source``) where it is set, else passes ``source`` on."""
    flag = names.new(f"{source}/{GATE}")
    position = numpy_helper.from_array(np.array(index, dtype=np.int64), names.new(flag + "_index"))
    inner = names.new(f"{out}/quantized")
    for node in region:
        node.output[:] = [inner if o == out else o for o in node.output]
    then_branch = helper.make_graph(
        region,
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

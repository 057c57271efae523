"""One QDQ model whose Q/DQ can be switched back to float at run time, one switch per unit.

For the per-layer view and the precision search. Every node input that the export rewired to a
quantized value becomes ``Where(enable[i], quantized, float)``, where ``enable`` is a bool graph
input with one entry per unit; the float source stays in the graph (a weight's float initializer
is put back beside its quantized form). A unit is a planned node (the Q/DQ it reads, or that its
rule placed where no planned node reads) or a shared-scale group (a tensor and those that reuse
its scale through data movement, switched together). One ONNX Runtime session then runs any mix:
all off is the float model, all on the exported one (computed in float: the switches keep ORT
from fusing the Q/DQ pairs into integer kernels).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcal_export.graphs.qdq import Names, sort_nodes
from qcal_export.spec.plan import Plan

ENABLE = "qcal_enable"
"""The switches' graph input: bool ``[len(units)]``, True where a unit runs quantized."""
GROUP = "scale group "
"""Prefix of a shared-scale group's unit name, followed by the tensor whose scale it shares."""


@dataclass(frozen=True)
class Slot:
    """Input ``index`` of node ``node`` reads ``tensor`` quantized; ``kind`` is "activation"
    or "weight"."""

    node: str
    index: int
    tensor: str
    kind: str


@dataclass
class Switchable:
    """The switchable model, its units in the order of ``enable`` with the slots each switches,
    and per quantized activation the (float, quantized) tensors that its SQNR compares."""

    model: onnx.ModelProto
    units: dict[str, list[Slot]]
    probes: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def nodes(self) -> list[str]:
        """The unit names, in the order of ``enable``."""
        return list(self.units)


def switch_units(plan: Plan) -> dict[str, list[Slot]]:
    """Every rewired input of ``plan`` as one slot of one unit: the slots of a shared-scale
    group's tensors go to ``GROUP + root``; any other slot to its reader where the reader asked
    for it (a planned node), else to the node whose rule placed it. Nodes in plan order, then
    groups."""
    roots = {entry.source for entry in plan.shared.values()}
    groups = {tensor: plan.root(tensor) for tensor in [*plan.shared, *roots]}
    kinds = {t: "activation" for t in [*plan.activations, *plan.shared]}
    kinds.update(dict.fromkeys(plan.weights, "weight"))
    entries = [*plan.activations.values(), *plan.weights.values(), *plan.shared.values()]
    owners: dict[tuple[str, int], tuple[str, str]] = {}
    for entry in entries:
        for use in entry.uses:
            slot = (use.node, use.index)
            if entry.tensor in groups:
                unit = GROUP + groups[entry.tensor]
            elif use.by is None or slot not in owners:
                unit = use.node if use.by is None else use.by
            else:
                continue
            owners[slot] = (unit, entry.tensor)
    order = [*plan.nodes, *(GROUP + root for root in dict.fromkeys(groups.values()))]
    units: dict[str, list[Slot]] = {name: [] for name in order}
    for (node, index), (unit, tensor) in owners.items():
        units.setdefault(unit, []).append(Slot(node, index, tensor, kinds[tensor]))
    return {name: slots for name, slots in units.items() if slots}


def switchable_model(
    original: onnx.ModelProto, exported: onnx.ModelProto, plan: Plan
) -> Switchable:
    """``exported`` (the QDQ form of ``original`` under ``plan``; edited in place) with a
    switch on every quantized input, one per unit of ``switch_units``."""
    graph = exported.graph
    floats = {t.name: t for t in original.graph.initializer}
    present = {t.name for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    names = Names(graph)
    units = switch_units(plan)
    switched = Switchable(exported, units)
    added = []
    for position, (unit, slots) in enumerate(units.items()):
        flag = names.new(f"{unit}/{ENABLE}".replace(" ", "_"))
        index = numpy_helper.from_array(np.array(position, dtype=np.int64), names.new(flag + "_i"))
        graph.initializer.append(index)
        added.append(helper.make_node("Gather", [ENABLE, index.name], [flag], name=flag, axis=0))
        for slot in slots:
            node = nodes[slot.node]
            quantized = node.input[slot.index]
            if slot.kind == "weight" and slot.tensor not in present:
                graph.initializer.append(floats[slot.tensor])
                present.add(slot.tensor)
            if slot.kind == "activation":
                switched.probes[slot.tensor] = (slot.tensor, quantized)
            out = names.new(f"{slot.tensor}/switched")
            added.append(helper.make_node("Where", [flag, quantized, slot.tensor], [out], name=out))
            node.input[slot.index] = out
    graph.node.extend(added)
    graph.input.append(helper.make_tensor_value_info(ENABLE, TensorProto.BOOL, [len(units)]))
    sort_nodes(graph)
    return switched


def without_units(plan: Plan, units: dict[str, list[Slot]], left: set[str]) -> Plan:
    """``plan`` with the units ``left`` in float, as the switchable model runs them off: every
    use in one of their slots dropped, the tensors no use is left to, the nodes among them
    moved to ``excluded``."""
    off = {(slot.node, slot.index) for unit in left for slot in units.get(unit, [])}

    def keep(plans: dict) -> dict:
        kept = {}
        for tensor, planned in plans.items():
            uses = [use for use in planned.uses if (use.node, use.index) not in off]
            if uses:
                kept[tensor] = dataclasses.replace(planned, uses=uses)
        return kept

    return dataclasses.replace(
        plan,
        activations=keep(plan.activations),
        weights=keep(plan.weights),
        shared=keep(plan.shared),
        nodes=[node for node in plan.nodes if node not in left],
        excluded=[*plan.excluded, *(node for node in plan.nodes if node in left)],
    )

"""Mixed formats: one model whose units each run in any of several formats or in float, and the
plan that gives each unit its own format.

For the mixed-format precision search (``analysis/mixed_formats``). The units are the switchable
model's (``switchable.switch_units``: planned nodes and shared-scale groups), joined where they
read the same quantized tensor: a tensor has one Q/DQ, one scale and so one format. Each format
(a level, cheapest first) has its own plan and scales over the same tensors; the leveled model
holds every level's Q/DQ, and each quantized input of a unit reads
``Where(enable[u, 0], level 0, Where(enable[u, 1], level 1, ... float))``.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from qcal_export.graphs.export import export_qdq
from qcal_export.graphs.opset_first import export_opset
from qcal_export.graphs.qdq import Names, raise_opset, sort_nodes
from qcal_export.graphs.switchable import ENABLE, Slot, Switchable, switch_units, without_units
from qcal_export.spec.plan import Plan
from qcal_export.spec.scales import TensorScales

LEVEL_MARK = "@"
"""Between a unit's name and its format in the leveled model's switch names: ``unit@fp8``."""


def format_units(plan: Plan) -> dict[str, list[Slot]]:
    """``switch_units(plan)`` joined where two units read the same quantized tensor (one
    format per tensor); a joined unit is named after its first member, in plan order."""
    units = switch_units(plan)
    parent = {name: name for name in units}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    owner: dict[str, str] = {}
    for name, slots in units.items():
        for slot in slots:
            first = owner.setdefault(slot.tensor, name)
            a, b = sorted((find(first), find(name)), key=list(units).index)
            parent[b] = a
    joined: dict[str, list[Slot]] = {}
    for name, slots in units.items():
        joined.setdefault(find(name), []).extend(slots)
    return joined


def members(plan: Plan, units: dict[str, list[Slot]]) -> dict[str, list[str]]:
    """The switchable units each of ``units`` (``format_units``) joins, in plan order."""
    joined = {slot: unit for unit, slots in units.items() for slot in slots}
    found: dict[str, list[str]] = {unit: [] for unit in units}
    for name, slots in switch_units(plan).items():
        found[joined[slots[0]]].append(name)
    return found


def leveled_model(
    original: onnx.ModelProto,
    levels: list[tuple[Plan, dict[str, TensorScales]]],
    units: dict[str, list[Slot]],
    weights_mode: str,
    nvfp4_form: str,
    names: list[str],
) -> Switchable:
    """``original`` (unchanged) exported at every level of ``levels`` (plan and scales per
    format, over the same tensors), each unit switched among them: ``enable`` holds
    ``len(units) * len(levels)`` entries, unit ``u`` at level ``k`` being entry
    ``u * len(levels) + k``; a unit with no entry on runs in float. ``names``: the formats,
    for the switches' names."""
    model = onnx.ModelProto()
    model.CopyFrom(original)
    model = raise_opset(model, max(export_opset(original, plan) for plan, _ in levels))
    floats = {t.name: t for t in original.graph.initializer}
    quantized: dict[tuple[str, int], list[str]] = {}
    for plan, scales in levels:
        model = export_qdq(model, plan, scales, weights_mode, nvfp4_form).model
        nodes = {n.name: n for n in model.graph.node}
        present = {t.name for t in model.graph.initializer}
        for slots in units.values():
            for slot in slots:
                node = nodes[slot.node]
                quantized.setdefault((slot.node, slot.index), []).append(node.input[slot.index])
                node.input[slot.index] = slot.tensor
                if slot.tensor in floats and slot.tensor not in present:
                    model.graph.initializer.append(floats[slot.tensor])
                    present.add(slot.tensor)
    switched = _switch(model, units, quantized, names)
    sort_nodes(model.graph)
    return switched


def _switch(
    model: onnx.ModelProto,
    units: dict[str, list[Slot]],
    quantized: dict[tuple[str, int], list[str]],
    formats: list[str],
) -> Switchable:
    """Every slot of ``units`` reading its level chain of ``Where``s (``leveled_model``)."""
    graph = model.graph
    names = Names(graph)
    nodes = {n.name: n for n in graph.node}
    count = len(formats)
    flags: dict[str, list[str]] = {}
    added: list[onnx.NodeProto] = []
    for u, unit in enumerate(units):
        flags[unit] = []
        for k, fmt in enumerate(formats):
            flag = names.new(f"{unit}{LEVEL_MARK}{fmt}/{ENABLE}".replace(" ", "_"))
            index = helper.make_tensor(
                names.new(flag + "_i"), TensorProto.INT64, [], [u * count + k]
            )
            graph.initializer.append(index)
            added.append(helper.make_node("Gather", [ENABLE, index.name], [flag], flag, axis=0))
            flags[unit].append(flag)
    for unit, slots in units.items():
        for slot in slots:
            value = slot.tensor
            for k in reversed(range(count)):
                out = names.new(f"{slot.tensor}/{formats[k]}/switched")
                chosen = quantized[(slot.node, slot.index)][k]
                added.append(helper.make_node("Where", [flags[unit][k], chosen, value], [out], out))
                value = out
            nodes[slot.node].input[slot.index] = value
    graph.node.extend(added)
    switches = [len(units) * count]
    graph.input.append(helper.make_tensor_value_info(ENABLE, TensorProto.BOOL, switches))
    pseudo = {f"{unit}{LEVEL_MARK}{fmt}": slots for unit, slots in units.items() for fmt in formats}
    return Switchable(model, pseudo)


def mixed_plan(
    levels: list[tuple[Plan, dict[str, TensorScales]]],
    joined: dict[str, list[str]],
    chosen: dict[str, int],
) -> tuple[Plan, dict[str, TensorScales]]:
    """One plan giving each unit of ``joined`` (``members``) the format of its level in
    ``chosen`` (``len(levels)``: float), with each tensor's scales from its level: every
    level's plan narrowed to its own units, then joined (the first level's notes kept)."""
    parts = []
    for k, (plan, scales) in enumerate(levels):
        others = {name for unit, names in joined.items() if chosen[unit] != k for name in names}
        part = without_units(plan, switch_units(plan), others)
        kept = {*part.activations, *part.weights}
        parts.append((part, {t: s for t, s in scales.items() if t in kept}))
    first = parts[0][0]
    nodes = [node for part, _ in parts for node in part.nodes]
    order = {node: i for i, node in enumerate([*first.nodes, *first.excluded])}
    return (
        Plan(
            activations={t: p for part, _ in parts for t, p in part.activations.items()},
            weights={t: p for part, _ in parts for t, p in part.weights.items()},
            nodes=sorted(nodes, key=lambda n: order.get(n, len(order))),
            excluded=[n for n in [*first.nodes, *first.excluded] if n not in nodes],
            float_subgraph_nodes=first.float_subgraph_nodes,
            notes=first.notes,
            skipped=first.skipped,
            partial=first.partial,
            shared={t: p for part, _ in parts for t, p in part.shared.items()},
            sentinel_nodes=first.sentinel_nodes,
            stream_nodes=first.stream_nodes,
            half_nodes=first.half_nodes,
            placement_notes=first.placement_notes,
        ),
        {t: s for _, scales in parts for t, s in scales.items()},
    )

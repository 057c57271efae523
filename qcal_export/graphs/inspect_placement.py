"""What ``qcal inspect --target`` shows of the plan a calibrate run would use: per quantized node
the inputs that get Q/DQ, every Q/DQ tensor with its shared-scale group, what stays float and why.

Read only: the plan is ``find_targets``'s, on a copy of the model with its nodes named.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from qcal_export.graphs.op_inputs import PLACEMENTS
from qcal_export.graphs.placement import SENTINEL, GraphView
from qcal_export.graphs.targets import find_targets, name_nodes
from qcal_export.onnx_io.tensor_types import tensor_infos
from qcal_export.spec.formats import get_format
from qcal_export.spec.plan import Plan
from qcal_export.spec.recipe import Recipe


@dataclass(frozen=True)
class PlacedTensor:
    """A tensor with Q/DQ: ``kind`` activation or weight, ``group`` the tensor whose scale it
    uses (itself unless it shares one), the ``readers`` (node:input) and the nodes whose rule
    asked for it (``by``)."""

    tensor: str
    kind: str
    group: str
    readers: tuple[str, ...]
    by: tuple[str, ...]


@dataclass(frozen=True)
class PlacementView:
    """The plan of ``recipe`` on a model, as ``qcal inspect`` prints it."""

    recipe: Recipe
    plan: Plan
    nodes: list[tuple[str, str, list[str]]]
    tensors: list[PlacedTensor]
    left_float: list[tuple[str, str]]

    def groups(self) -> dict[str, list[str]]:
        """Shared-scale groups of more than one tensor: root -> its tensors, root first."""
        found: dict[str, list[str]] = {}
        for row in self.tensors:
            found.setdefault(row.group, []).append(row.tensor)
        return {
            root: sorted(tensors, key=lambda t: t != root)
            for root, tensors in found.items()
            if len(tensors) > 1
        }

    def count_line(self) -> str:
        plan, activations = self.plan, [t for t in self.tensors if t.kind == "activation"]
        spec = self.recipe.activation
        return (
            f"placement (--target {self.recipe.target}, activations "
            f"{spec.format if spec else 'float'}): {len(plan.nodes)} nodes quantized; Q/DQ on "
            f"{len(activations)} activations ({len(plan.shared)} sharing a scale, in "
            f"{len(self.groups())} scale groups) and {len(plan.weights)} weights; "
            f"{len(self.left_float)} tensors left float; {len(plan.excluded)} nodes excluded, "
            f"{len(plan.skipped)} with nothing to quantize"
        )

    def lines(self) -> list[str]:
        """The details: one line per node, per Q/DQ tensor, per float tensor or node."""
        out = [
            f"{'node' if name in self.plan.nodes else 'float reader'} {name} ({op}): "
            + ", ".join(inputs)
            for name, op, inputs in self.nodes
        ]
        for row in self.tensors:
            scale = "own scale" if row.group == row.tensor else f"scale of {row.group}"
            by = f"; placed by {', '.join(row.by)}" if row.by else ""
            out.append(
                f"Q/DQ {row.tensor} ({row.kind}, {scale}): read by {', '.join(row.readers)}{by}"
            )
        for root, tensors in self.groups().items():
            out.append(f"scale group {root}: {', '.join(tensors)}")
        out += [f"float {tensor}: {why}" for tensor, why in self.left_float]
        out += [f"float node {node}: excluded by the recipe" for node in self.plan.excluded]
        out += [f"float node {node}: {why}" for node, why in self.plan.skipped.items()]
        return out


def placement_view(model: onnx.ModelProto, recipe: Recipe) -> PlacementView:
    """The plan ``recipe`` gives ``model`` (not edited), laid out per node and per tensor."""
    working = onnx.ModelProto()
    working.CopyFrom(model)
    name_nodes(working)
    plan = find_targets(working, recipe)
    entries = [
        *(("activation", e) for e in plan.activations.values()),
        *(("activation", e) for e in plan.shared.values()),
        *(("weight", e) for e in plan.weights.values()),
    ]
    per_node: dict[str, list[str]] = {}
    tensors = []
    for kind, entry in entries:
        slots = dict.fromkeys((use.node, use.index) for use in entry.uses)
        for node, index in slots:
            per_node.setdefault(node, []).append(f"input {index} {entry.tensor} {kind}")
        by = dict.fromkeys(use.by for use in entry.uses if use.by)
        readers = tuple(f"{node}:{index}" for node, index in slots)
        tensors.append(
            PlacedTensor(entry.tensor, kind, plan.root(entry.tensor), readers, tuple(by))
        )
    ops = {node.name: node.op_type for node in working.graph.node}
    nodes = [(n, ops[n], sorted(per_node[n])) for n in ops if n in per_node]
    return PlacementView(recipe, plan, nodes, tensors, _left_float(working, plan, recipe))


def _left_float(model: onnx.ModelProto, plan: Plan, recipe: Recipe) -> list[tuple[str, str]]:
    """Tensors around the nodes the target places Q/DQ on that stay float: sentinel values
    (attention masks) and the graph outputs of planned nodes whose outputs it quantizes."""
    graph = model.graph
    view = GraphView.of(graph, tensor_infos(model))
    rules = PLACEMENTS[recipe.target]
    quantizes_output = rules.own_output | rules.share_output | rules.share_split
    found: dict[str, str] = {}
    for node in graph.node:
        if node.name in plan.sentinel_nodes:
            for tensor in [*node.input, *node.output]:
                if tensor in view.sentinels and not plan.is_quantized(tensor):
                    found.setdefault(
                        tensor,
                        f"sentinel values (|x| >= {SENTINEL:g}, an attention mask's stand-in "
                        f"for -inf) around node {node.name}: one scale would round all else "
                        "to zero",
                    )
        elif node.name in plan.nodes and node.op_type in quantizes_output and _placed(node, recipe):
            for tensor in node.output:
                if tensor in view.outputs and view.is_float(tensor):
                    found.setdefault(
                        tensor, f"graph output of node {node.name}: the model's outputs stay float"
                    )
    return list(found.items())


def _placed(node: onnx.NodeProto, recipe: Recipe) -> bool:
    """Whether the target places Q/DQ around ``node`` beyond its inputs: a per-tensor
    activation format (block formats and weight-only recipes keep to the compute ops' inputs)."""
    spec = recipe.specs_for(node.name, node.op_type)[0]
    return spec is not None and get_format(spec.format).block_size == 1

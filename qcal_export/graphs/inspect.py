"""What ``qcal inspect`` lists: quantizable nodes with their activation and weight shapes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx

from qcal_export.graphs.targets import find_targets, name_nodes
from qcal_export.spec.recipe import DEFAULT_OP_TYPES, Recipe


@dataclass(frozen=True)
class NodeRow:
    node: str
    op_type: str
    activations: tuple[str, ...]
    weight: str | None
    axis: str


def _shapes(model: onnx.ModelProto) -> dict[str, str]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    graph = inferred.graph
    shapes = {t.name: "x".join(map(str, t.dims)) for t in graph.initializer}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        shapes[info.name] = _shape_text(info.type.tensor_type)
    return shapes


def _shape_text(tensor_type: onnx.TypeProto.Tensor) -> str:
    """``bx4`` from a tensor type; ``?`` for an unknown rank (no shape field, as shape inference
    leaves a tensor it cannot follow: not a scalar) and for a dimension with neither value nor
    name."""
    if not tensor_type.HasField("shape"):
        return "?"
    dims = tensor_type.shape.dim
    text = (d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in dims)
    return "x".join(text) or "scalar"


def quantizable_nodes(
    model: onnx.ModelProto, op_types: Sequence[str] | None = None, recipe: Recipe | None = None
) -> list[NodeRow]:
    """One row per node ``recipe`` (default: the default recipe with ``op_types``) would
    quantize."""
    working = onnx.ModelProto()
    working.CopyFrom(model)
    name_nodes(working)
    recipe = recipe or Recipe(op_types=tuple(op_types or DEFAULT_OP_TYPES))
    plan = find_targets(working, recipe)
    shapes = _shapes(working)
    rows = []
    for node in working.graph.node:
        if node.name not in plan.nodes:
            continue
        acts = tuple(f"{t} [{shapes.get(t, '?')}]" for t in node.input if t in plan.activations)
        weight = next((t for t in node.input if t in plan.weights), None)
        axis = "" if weight is None else str(plan.weights[weight].axis)
        label = None if weight is None else f"{weight} [{shapes.get(weight, '?')}]"
        rows.append(NodeRow(node.name, node.op_type, acts, label, axis))
    return rows

"""Apply a plan's scales to a model: raise the opset as needed, insert Q/DQ, sort, check."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from qcal_export.artifacts.scales import TensorScales
from qcal_export.errors import ScalesError
from qcal_export.formats import get_format
from qcal_export.graphs.model_io import default_opset
from qcal_export.graphs.qdq import (
    Names,
    insert_activation_qdq,
    quantize_weight,
    raise_opset,
    required_opset,
    sort_nodes,
)
from qcal_export.graphs.targets import Plan
from qcal_export.graphs.validate import check_model


@dataclass
class ExportResult:
    model: onnx.ModelProto
    opset_from: int
    opset_to: int


def check_scales_match(plan: Plan, scales: Mapping[str, TensorScales], origin: str) -> None:
    """ScalesError naming the first planned tensor whose scales are missing or do not fit."""
    planned = [(t, p.spec, None, "activation") for t, p in plan.activations.items()]
    planned += [(t, p.spec, p.axis, "weight") for t, p in plan.weights.items()]
    for tensor, spec, axis, kind in planned:
        entry = scales.get(tensor)
        if entry is None:
            raise ScalesError(
                f"{origin} has no scales for {kind} {tensor!r}: recalibrate this model"
            )
        if (entry.format, entry.axis) != (spec.format, axis):
            raise ScalesError(
                f"{origin}: {kind} {tensor!r} was calibrated as {entry.format} "
                f"{entry.granularity}, the recipe asks for {spec.format} axis={axis}"
            )


def export_qdq(
    model: onnx.ModelProto, plan: Plan, scales: Mapping[str, TensorScales], weights_mode: str
) -> ExportResult:
    """Edit ``model`` into its QDQ form, in place (a new proto if the opset converter ran)."""
    formats = [get_format(s.format) for s in scales.values()]
    float_types = {p.elem_type for p in plan.activations.values()}
    float_types |= {t.data_type for t in model.graph.initializer if t.name in plan.weights}
    per_axis = any(p.axis is not None for p in plan.weights.values())
    opset_from = default_opset(model)
    model = raise_opset(model, required_opset(formats, per_axis, float_types))
    graph = model.graph
    names = Names(graph)
    for tensor, weight in plan.weights.items():
        quantize_weight(graph, weight, scales[tensor].qparams(), weights_mode, names)
    for tensor, activation in plan.activations.items():
        insert_activation_qdq(graph, activation, scales[tensor].qparams(), names)
    sort_nodes(graph)
    check_model(model, "the quantized model", full=True)
    return ExportResult(model, opset_from, default_opset(model))

"""Apply a plan's scales to a model: raise the opset as needed, insert Q/DQ, sort, check."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx

from qcal_export.artifacts.scales import TensorScales
from qcal_export.errors import ModelError, ScalesError
from qcal_export.formats import NVFP4Format, get_format
from qcal_export.granularity import PerTensor
from qcal_export.graphs.model_io import default_opset
from qcal_export.graphs.nvfp4 import (
    TRT_DOMAIN,
    add_trt_domain,
    insert_activation_nvfp4,
    quantize_weight_nvfp4,
)
from qcal_export.graphs.ort_forms import (
    ZERO_POINT_FREE_OPSET,
    drop_zero_points,
    fp8_after_relu,
    shield_matmul_weights,
)
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
    notes: list[str] = field(default_factory=list)


def check_scales_match(plan: Plan, scales: Mapping[str, TensorScales], origin: str) -> None:
    """ScalesError naming the first planned tensor whose scales are missing or do not fit."""
    planned = [(t, p.spec, PerTensor(), "activation") for t, p in plan.activations.items()]
    planned += [(t, p.spec, p.granularity, "weight") for t, p in plan.weights.items()]
    for tensor, spec, granularity, kind in planned:
        entry = scales.get(tensor)
        if entry is None:
            raise ScalesError(
                f"{origin} has no scales for {kind} {tensor!r}: recalibrate this model"
            )
        if (entry.format, entry.granularity) != (spec.format, granularity):
            raise ScalesError(
                f"{origin}: {kind} {tensor!r} was calibrated as {entry.format} "
                f"{entry.granularity.describe()}, the recipe asks for {spec.format} "
                f"{granularity.describe()}"
            )


def export_qdq(
    model: onnx.ModelProto,
    plan: Plan,
    scales: Mapping[str, TensorScales],
    weights_mode: str,
    nvfp4_form: str = "portable",
) -> ExportResult:
    """Edit ``model`` into its QDQ form, in place (a new proto if the opset converter ran).

    ``nvfp4_form``: "portable" (standard ops) or "tensorrt" (Model Optimizer's custom op for
    NVFP4 activations, MatMul weights stored ``[N, K]``). Where ONNX Runtime's default
    optimizations miscompute the plain QDQ form, the same math is written in a form they run
    (``ort_forms``; opset 21 for fp8 activations after a Relu), and the notes say so.
    """
    formats = [get_format(s.format) for s in scales.values()]
    float_types = {p.elem_type for p in plan.activations.values()}
    float_types |= {t.data_type for t in model.graph.initializer if t.name in plan.weights}
    granularities = [p.granularity for p in plan.weights.values()]
    opset_from = default_opset(model)
    notes: list[str] = []
    zero_point_free = fp8_after_relu(model.graph, plan)
    if zero_point_free:
        try:
            model = raise_opset(model, ZERO_POINT_FREE_OPSET)
        except ModelError as e:
            zero_point_free = []
            notes.append(f"fp8 activations after a Relu keep their zero points: {e}")
    model = raise_opset(model, required_opset(formats, granularities, float_types))
    graph = model.graph
    names = Names(graph)
    for tensor, weight in plan.weights.items():
        q = scales[tensor].qparams()
        if isinstance(q.fmt, NVFP4Format):
            quantize_weight_nvfp4(graph, weight, q, weights_mode, names, nvfp4_form)
        else:
            quantize_weight(graph, weight, q, weights_mode, names)
    for tensor, activation in plan.activations.items():
        q = scales[tensor].qparams()
        if isinstance(q.fmt, NVFP4Format):
            notes.append(insert_activation_nvfp4(graph, activation, q, names, nvfp4_form))
        else:
            insert_activation_qdq(graph, activation, q, names)
    notes += drop_zero_points(graph, zero_point_free)
    notes += shield_matmul_weights(graph, names)
    if any(node.domain == TRT_DOMAIN for node in graph.node):
        add_trt_domain(model)
    sort_nodes(graph)
    check_model(model, "the quantized model", full=True)
    return ExportResult(model, opset_from, default_opset(model), [n for n in notes if n])

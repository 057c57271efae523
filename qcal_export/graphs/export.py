"""Apply a plan's scales to a model: raise the opset as needed, insert Q/DQ, sort, check."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from qcal_export.errors import ModelError, ScalesError
from qcal_export.graphs.matmul_nbits import write_nbits
from qcal_export.graphs.mx import insert_activation_mx, quantize_weight_mx
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
    insert_shared_qdq,
    quantize_weight,
    raise_opset,
    required_opset,
    sort_nodes,
)
from qcal_export.onnx_io.model_io import check_model, default_opset
from qcal_export.spec.formats import get_format, type_name
from qcal_export.spec.granularity import PerTensor
from qcal_export.spec.plan import Plan, WeightPlan
from qcal_export.spec.scales import TensorScales


@dataclass
class ExportResult:
    model: onnx.ModelProto
    opset_from: int
    opset_to: int
    notes: list[str] = field(default_factory=list)
    activation_params: dict[str, list[str]] = field(default_factory=dict)
    """Per quantized activation, the initializers holding its calibrated values: its Q/DQ
    scale and zero point, or NVFP4's global scale (MX activations have none)."""


def check_scales_match(plan: Plan, scales: Mapping[str, TensorScales], origin: str) -> None:
    """ScalesError naming the first planned tensor whose scales are missing or do not fit: its
    format, granularity or scale shape differs from the plan's, or a scale is 0 or infinite in
    the tensor's own float type (a float16 model's scales are float16)."""
    planned = [
        (t, p.spec, PerTensor(), "activation", (), p.elem_type) for t, p in plan.activations.items()
    ]
    planned += [
        (t, p.spec, p.granularity, "weight", _stat_shape(p), p.elem_type)
        for t, p in plan.weights.items()
    ]
    for tensor, spec, granularity, kind, shape, float_type in planned:
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
        _check_fit(f"{origin}: {kind} {tensor!r}", entry, shape, float_type)


def _stat_shape(weight: WeightPlan) -> tuple[int, ...] | None:
    return None if weight.shape is None else weight.granularity.stat_shape(weight.shape)


def _check_fit(
    where: str, entry: TensorScales, shape: tuple[int, ...] | None, float_type: int
) -> None:
    """ScalesError when the scale has another shape than ``shape`` (the granularity's for the
    tensor in this model; None: unknown) or is 0 or infinite as ``float_type``."""
    if shape is not None and tuple(entry.scale.shape) != shape:
        raise ScalesError(
            f"{where}: scale of shape {list(entry.scale.shape)}, but "
            f"{entry.granularity.describe()} of this model's tensor needs {list(shape)}: "
            "recalibrate this model"
        )
    dtype = helper.tensor_dtype_to_np_dtype(float_type)
    for key, value in (("scale", entry.scale), ("global_scale", entry.global_scale)):
        if value is None:
            continue
        with np.errstate(over="ignore"):  # an overflow to inf is what this looks for
            cast = value.float().numpy().astype(dtype).astype(np.float32)
        if not (np.isfinite(cast).all() and (cast > 0).all()):
            raise ScalesError(
                f"{where}: {key} (from {float(value.min()):g} to {float(value.max()):g}) is 0 "
                f"or infinite as {type_name(float_type)}, the model's type: recalibrate this model"
            )


def _raise_opset_for(
    model: onnx.ModelProto, plan: Plan, scales: Mapping[str, TensorScales]
) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """``model`` at the opset its formats, granularities and float types need, and at opset 21
    where fp8 activations after a Relu can drop their zero points; those activations, and a
    note when the converter cannot raise the opset (then there are none)."""
    notes: list[str] = []
    formats = [get_format(s.format) for s in scales.values()]
    float_types = {p.elem_type for p in plan.activations.values()}
    float_types |= {t.data_type for t in model.graph.initializer if t.name in plan.weights}
    granularities = [p.granularity for p in plan.weights.values()]
    zero_point_free = fp8_after_relu(model.graph, plan)
    if zero_point_free:
        try:
            model = raise_opset(model, ZERO_POINT_FREE_OPSET)
        except ModelError as e:
            zero_point_free = []
            notes.append(f"fp8 activations after a Relu keep their zero points: {e}")
    model = raise_opset(model, required_opset(formats, granularities, float_types))
    return model, zero_point_free, notes


def export_qdq(
    model: onnx.ModelProto,
    plan: Plan,
    scales: Mapping[str, TensorScales],
    weights_mode: str,
    nvfp4_form: str = "portable",
    int4_layout: str = "qdq",
) -> ExportResult:
    """Edit ``model`` into its QDQ form, in place (a new proto if the opset converter ran).

    ``nvfp4_form``: "portable" (standard ops) or "tensorrt" (Model Optimizer's custom op for
    NVFP4 activations, MatMul weights stored ``[N, K]``). Where ONNX Runtime's default
    optimizations miscompute the plain QDQ form, the same math is written in a form they run
    (``ort_forms``; opset 21 for fp8 activations after a Relu), and the notes say so.
    ``int4_layout``: "qdq", or "matmulnbits" (4-bit MatMul weights as ONNX Runtime's
    MatMulNBits where they fit, ``matmul_nbits``).
    """
    opset_from = default_opset(model)
    model, zero_point_free, notes = _raise_opset_for(model, plan, scales)
    graph = model.graph
    names = Names(graph)
    params: dict[str, list[str]] = {}
    nbits: set[str] = set()
    if int4_layout == "matmulnbits":
        nbits, nbits_notes = write_nbits(model, plan, scales, names)
        notes += nbits_notes
    for tensor, weight in plan.weights.items():
        q = scales[tensor].qparams()
        if tensor in nbits:
            continue
        if q.fmt.two_level:
            quantize_weight_nvfp4(graph, weight, q, weights_mode, names, nvfp4_form)
        elif q.fmt.shared_exponent:
            quantize_weight_mx(graph, weight, q, weights_mode, names)
        else:
            params[tensor] = quantize_weight(graph, weight, q, weights_mode, names)
    activation_params = _insert_activations(graph, plan, scales, names, nvfp4_form, notes)
    params.update(activation_params)
    for shared in plan.shared.values():
        insert_shared_qdq(graph, shared, params[shared.source], PerTensor(), names)
    notes += drop_zero_points(graph, zero_point_free)
    notes += shield_matmul_weights(graph, names)
    if any(node.domain == TRT_DOMAIN for node in graph.node):
        add_trt_domain(model)
    sort_nodes(graph)
    check_model(model, "the quantized model", full=True)
    kept = [n for n in notes if n]
    return ExportResult(model, opset_from, default_opset(model), kept, activation_params)


def _insert_activations(
    graph: onnx.GraphProto,
    plan: Plan,
    scales: Mapping[str, TensorScales],
    names: Names,
    nvfp4_form: str,
    notes: list[str],
) -> dict[str, list[str]]:
    """Each planned activation's Q -> DQ (NVFP4's and MX's in-graph chains); per activation,
    the initializers holding its calibrated values (scale and zero point, NVFP4's global
    scale; none for MX). Notes are appended to ``notes``."""
    params: dict[str, list[str]] = {}
    for tensor, activation in plan.activations.items():
        q = scales[tensor].qparams()
        if q.fmt.two_level:
            global_name, note = insert_activation_nvfp4(graph, activation, q, names, nvfp4_form)
            params[tensor] = [global_name]
            notes.append(note)
        elif q.fmt.shared_exponent:
            insert_activation_mx(graph, activation, q.fmt, names)
            params[tensor] = []
        else:
            params[tensor] = insert_activation_qdq(graph, activation, q, names)
    return params

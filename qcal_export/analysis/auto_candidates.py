"""What method ``auto``'s two scorings (gated runs, ``method_choice``; stacked runs,
``stacked_scoring``) share: the export that quantizes only the scored activations, each
candidate's scale inputs, the candidates equal to an earlier one, the activations that need no
scoring (a constant of one value) and float64 squared norms.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx

from qcal_export.analysis.planned import PlannedModel
from qcal_export.graphs.export import ExportResult, export_qdq
from qcal_export.graphs.preprocess import constant_tensors
from qcal_export.onnx_io.weights import to_array
from qcal_export.spec.formats import get_format
from qcal_export.spec.methods import MAX
from qcal_export.spec.plan import Plan
from qcal_export.spec.scales import TensorScales

EXACT = "a constant of one value, which max's scale represents exactly: not scored"
"""The report's word on an activation ``exact_constants`` picked max for."""


def narrowed_export(
    planned: PlannedModel, found: dict[str, TensorScales], tensors: set[str]
) -> tuple[Plan, ExportResult]:
    """The plan narrowed to the activations ``tensors`` (and the tensors sharing their scale),
    weights left float, and a copy of the planned model exported to it at the scales
    ``found``."""
    plan = planned.plan
    narrowed = dataclasses.replace(
        plan,
        activations={t: a for t, a in plan.activations.items() if t in tensors},
        weights={},
        shared={t: s for t, s in plan.shared.items() if plan.root(t) in tensors},
    )
    model = onnx.ModelProto()
    model.CopyFrom(planned.model)
    recipe = planned.recipe
    return narrowed, export_qdq(model, narrowed, found, recipe.weights_mode, recipe.nvfp4_form)


def scale_feed(
    scales: TensorScales, names: list[str], inits: dict[str, onnx.TensorProto]
) -> dict[str, np.ndarray]:
    """A candidate's scale (a two-level format's global scale) and, where the graph has one,
    zero point, as the inputs that replace the exported initializers, in their dtypes."""
    q = scales.qparams()
    scale_name, zero_name = (*names, None)[:2]
    scale = q.global_scale if q.fmt.two_level else q.scale
    dtype = to_array(inits[scale_name]).dtype
    feed = {scale_name: scale.numpy().astype(dtype).reshape(inits[scale_name].dims)}
    if zero_name is not None and not q.fmt.symmetric:
        zero = to_array(inits[zero_name])
        values = q.fmt.encode_zero_point(q.zero_point).numpy()
        feed[zero_name] = values.astype(zero.dtype).reshape(zero.shape)
    return feed


def exact_constants(
    graph: onnx.GraphProto, candidates: dict[str, dict[str, TensorScales]]
) -> set[str]:
    """The activations of ``candidates`` that are constants of one element (known before any
    input is fed: a scalar an exporter wrote as a Constant node, say) with a one-level max
    candidate. Max's range is then that value, which its scale represents exactly (up to
    float rounding), so no candidate's output error is lower: max is picked unscored."""
    constant = constant_tensors(graph)
    sizes = _stated_sizes(graph)
    return {
        tensor
        for tensor, methods in candidates.items()
        if tensor in constant
        and sizes.get(tensor) == 1
        and MAX.name in methods
        and not get_format(methods[MAX.name].format).two_level
    }


def _stated_sizes(graph: onnx.GraphProto) -> dict[str, int]:
    """Element counts the graph states: of initializers, Constant nodes' values and tensors
    whose value info gives every dim."""
    sizes = {t.name: math.prod(t.dims) for t in graph.initializer}
    for info in [*graph.value_info, *graph.output]:
        typed = info.type.tensor_type
        dims = typed.shape.dim
        if typed.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            sizes[info.name] = math.prod(d.dim_value for d in dims)
    for node in graph.node:
        if node.op_type == "Constant" and not node.domain and node.attribute:
            attribute = node.attribute[0]
            if attribute.name == "value":
                sizes[node.output[0]] = math.prod(attribute.t.dims)
            elif attribute.name in ("value_float", "value_int"):
                sizes[node.output[0]] = 1
            elif attribute.name in ("value_floats", "value_ints"):
                sizes[node.output[0]] = len(onnx.helper.get_attribute_value(attribute))
    return sizes


def first_equal(methods: dict[str, dict[str, np.ndarray]]) -> dict[str, str]:
    """Per method, the first method whose scale inputs equal its own (itself if none)."""
    firsts: dict[str, str] = {}
    for method, feed in methods.items():
        firsts[method] = next(
            (m for m in firsts if m == firsts[m] and _equal_feeds(methods[m], feed)), method
        )
    return firsts


def _equal_feeds(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def squared(a: np.ndarray, b: np.ndarray | None = None) -> float:
    """``sum((a - b) ** 2)`` (``sum(a ** 2)`` without ``b``) in float64."""
    d = np.asarray(a, dtype=np.float64)
    if b is not None:
        d = d - np.asarray(b, dtype=np.float64)
    return float(np.sum(d * d))

"""What a mixed-format choice costs: each unit's row for the report, and the bits per weight and
per activation overall, weighted by element counts.

A tensor's bits are its stored element's, plus its block scales spread over the block (NVFP4:
4 + 8/16; MX: element + 8/32; int4 blocks: 4 + the float scale over the block); per-tensor and
per-channel scales are not counted. A unit left in float costs its float type's bits.
Activations are counted on the first batch of the data (their shapes may be dynamic).
"""

from __future__ import annotations

from typing import Any

from onnx import TensorProto

from qcal_export.analysis.planned import PlannedModel
from qcal_export.analysis.sensitivity import LayerView
from qcal_export.capture.data import DataSource, feeds, model_inputs
from qcal_export.capture.onnxruntime import open_session
from qcal_export.graphs.mixed_switch import LEVEL_MARK
from qcal_export.graphs.switchable import Slot
from qcal_export.onnx_io.tensor_types import tensor_types
from qcal_export.spec.formats import FORMATS
from qcal_export.spec.granularity import PerBlock
from qcal_export.spec.plan import Plan

TYPE_BITS = {
    **dict.fromkeys((TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT4E2M1), 4),
    **dict.fromkeys((TensorProto.INT8, TensorProto.UINT8, TensorProto.FLOAT8E4M3FN), 8),
    TensorProto.FLOAT8E8M0: 8,
    **dict.fromkeys((TensorProto.INT16, TensorProto.UINT16), 16),
    **dict.fromkeys((TensorProto.FLOAT16, TensorProto.BFLOAT16), 16),
    TensorProto.FLOAT: 32,
    TensorProto.DOUBLE: 64,
}
"""Bits of one element of an ONNX element type."""


def tensor_bits(plan: Plan, tensor: str, float_type: int) -> float:
    """Bits per element of ``tensor`` as ``plan`` quantizes it (a shared one as its root)."""
    root = plan.root(tensor)
    if root in plan.weights:
        weight = plan.weights[root]
        fmt = FORMATS[weight.spec.format]
        block = weight.granularity.size if isinstance(weight.granularity, PerBlock) else None
    else:
        activation = plan.activations[root]
        fmt = FORMATS[activation.spec.format]
        block = fmt.block_size if fmt.block_size > 1 else None
    bits = float(TYPE_BITS[fmt.onnx_type])
    if block:
        scale_type = getattr(fmt, "scale_onnx_type", float_type)
        bits += TYPE_BITS[scale_type] / block
    return bits


def element_counts(
    planned: PlannedModel, plan: Plan, source: DataSource
) -> dict[str, tuple[int, int]]:
    """Elements and float type of every tensor ``plan`` quantizes: the weights' from the
    model, the activations' on the first batch of ``source``."""
    model = planned.model
    counts = {
        t.name: (_numel(t), t.data_type) for t in model.graph.initializer if t.name in plan.weights
    }
    types = tensor_types(model)
    outputs = {o.name for o in model.graph.output}
    tensors = [t for t in [*plan.activations, *plan.shared] if t in types]
    if not tensors:
        return counts
    extra = {t: types[t] for t in tensors if t not in outputs}
    session = open_session(model, planned.providers, planned.name, extra_outputs=extra)
    feed = next(feeds(source, model_inputs(model), 1))
    values = session.run(tensors, feed)
    counts.update({t: (int(v.size), types[t]) for t, v in zip(tensors, values, strict=True)})
    return counts


def overall_bits(
    plans: list[Plan],
    units: dict[str, list[Slot]],
    chosen: dict[str, int],
    counts: dict[str, tuple[int, int]],
) -> dict[str, Any]:
    """Bits per weight and per activation over every tensor the units quantize at some level,
    weighted by element counts (``counts``: elements and float type), as ``chosen`` places
    them (a level of ``plans``, each format's plan; ``len(plans)``: float)."""
    totals = {"weight": [0.0, 0], "activation": [0.0, 0]}
    seen: set[str] = set()
    for unit, slots in units.items():
        level = chosen[unit]
        for slot in slots:
            if slot.tensor in seen:
                continue
            seen.add(slot.tensor)
            numel, float_type = counts.get(slot.tensor, (0, TensorProto.FLOAT))
            if level < len(plans):
                bits = tensor_bits(plans[level], slot.tensor, float_type)
            else:
                bits = float(TYPE_BITS[float_type])
            totals[slot.kind][0] += bits * numel
            totals[slot.kind][1] += numel
    return {
        f"per_{kind}": round(total / numel, 4) if numel else None
        for kind, (total, numel) in totals.items()
    } | {f"{kind}_elements": numel for kind, (_, numel) in totals.items()}


def format_rows(
    units: dict[str, list[Slot]],
    joined: dict[str, list[str]],
    chosen: dict[str, int],
    names: list[str],
    view: LayerView,
) -> list[dict[str, Any]]:
    """One report row per unit: its format, the switchable units it joins, its tensors and
    its output error alone at each format."""
    rows = []
    for unit, slots in units.items():
        rows.append(
            {
                "unit": unit,
                "format": names[chosen[unit]],
                "joins": joined[unit],
                "weights": list(dict.fromkeys(s.tensor for s in slots if s.kind == "weight")),
                "activations": list(
                    dict.fromkeys(s.tensor for s in slots if s.kind == "activation")
                ),
                "output_error_alone": {
                    fmt: view.alone[f"{unit}{LEVEL_MARK}{fmt}"] for fmt in names[:-1]
                },
            }
        )
    return rows


def _numel(tensor: TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count

"""Raise a model's opset before planning where the Q/DQ export would have onnx's version
converter rewrite ops: a plan made on the old graph names node inputs that the converter moves
(Softmax below opset 13 gets a Flatten before it and a Reshape after, so a Q/DQ planned for its
input no longer finds it). Planned on the converted graph, the uses are where export finds them.
"""

from __future__ import annotations

from collections import Counter

import onnx

from qcal_export.graphs.ort_forms import ZERO_POINT_FREE_OPSET, fp8_after_relu
from qcal_export.graphs.qdq import raise_opset, required_opset
from qcal_export.graphs.targets import Plan, name_nodes
from qcal_export.onnx_io.model_io import default_opset
from qcal_export.spec.formats import get_format


def export_opset(model: onnx.ModelProto, plan: Plan) -> int:
    """The default-domain opset ``export_qdq`` raises ``model`` to for ``plan``: what the
    planned formats, weight axes and scale types need (21 for fp8 activations after a Relu)."""
    specs = [p.spec for p in plan.activations.values()] + [p.spec for p in plan.weights.values()]
    float_types = {p.elem_type for p in plan.activations.values()}
    float_types |= {t.data_type for t in model.graph.initializer if t.name in plan.weights}
    granularities = [p.granularity for p in plan.weights.values()]
    opset = required_opset([get_format(s.format) for s in specs], granularities, float_types)
    if fp8_after_relu(model.graph, plan):
        opset = max(opset, ZERO_POINT_FREE_OPSET)
    return opset


def converted_for_export(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto | None:
    """``model`` at the opset its export needs, where reaching it runs the version converter
    (which rewrites ops; the nodes it adds are named as pre-processing names them); None where
    the export only changes the version number, or where the converter fails (the export then
    says why)."""
    target = export_opset(model, plan)
    if default_opset(model) >= target:
        return None
    working = onnx.ModelProto()
    working.CopyFrom(model)
    try:
        converted = raise_opset(working, target)
    except Exception:  # export_qdq raises the same conversion's ModelError, naming the ops
        return None
    if converted is working:
        return None
    name_nodes(converted)
    return converted


def opset_change(model: onnx.ModelProto, converted: onnx.ModelProto) -> str:
    """The pre-processing line for ``converted_for_export``: the opsets and the nodes the
    converter added or removed, by op type."""
    before = Counter(node.op_type for node in model.graph.node)
    after = Counter(node.op_type for node in converted.graph.node)
    added, removed = dict(sorted((after - before).items())), dict(sorted((before - after).items()))
    return (
        f"opset raised from {default_opset(model)} to {default_opset(converted)} before "
        f"planning, as the Q/DQ export needs it (onnx's version converter added {added}, "
        f"removed {removed})"
    )

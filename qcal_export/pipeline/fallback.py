"""A placement that costs what it should not: keep only the compute ops quantized.

The Q/DQ a target places beyond the compute ops' inputs (around Add, Mul, Concat, pooling,
Softmax, shared through data movement) let ONNX Runtime run integer kernels end to end. In
models that write a normalization or an activation as a chain of Mul and Add (jax2tf, tf2onnx
exports of LayerNorm and tanh-GELU), one scale per tensor ruins some links of the chain, and
the model collapses although every compute op quantizes well. Where the validated model falls
below ``min_cosine``, the run exports once more with only the compute ops quantized (their
inputs, and the outputs their rule quantizes for float readers; the scales are the same: no
calibration runs again) and keeps that model where it at least halves the output error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import onnx

from qcal_export.graphs.export import ExportResult
from qcal_export.graphs.op_inputs import COMPUTE_OPS
from qcal_export.spec.plan import Plan, without_nodes
from qcal_export.validation.validate import Validation

log = logging.getLogger(__name__)

HALF = 0.5
"""The compute-ops model is kept where its output error (1 - cosine) is at most this share of
the placed model's: the placement, not the compute ops' own quantization, then costs most of
the accuracy. A smaller gain is not worth the integer kernels the placement buys."""


def compute_ops_only(plan: Plan, model: onnx.ModelProto) -> Plan | None:
    """``plan`` with the non-compute nodes it placed Q/DQ around left in float (their inputs,
    outputs and the scales shared through them); None where it has none."""
    op_types = {node.name: node.op_type for node in model.graph.node}
    placed = [node for node in plan.nodes if op_types.get(node) not in COMPUTE_OPS]
    return without_nodes(plan, placed) if placed else None


def fallback_source(plan: Plan, model: onnx.ModelProto) -> tuple[Plan, onnx.ModelProto] | None:
    """Where a fallback could apply (the plan places Q/DQ beyond the compute ops): the
    compute-ops plan, and a copy of ``model`` to export it from (the export edits its model in
    place), taken before the first export; it shares the model's stored weights."""
    narrow = compute_ops_only(plan, model)
    if narrow is None:
        return None
    spare = onnx.ModelProto()
    spare.CopyFrom(model)
    return narrow, spare


def fall_back(
    plan: Plan,
    narrow: Plan,
    first: tuple[ExportResult, Validation],
    export: Callable[[Plan], ExportResult],
    validate: Callable[[onnx.ModelProto], Validation],
    min_cosine: float,
) -> tuple[Plan, ExportResult, Validation]:
    """The plan, model and validation to keep: ``first`` where it reaches ``min_cosine`` or
    the export of the compute-ops plan ``narrow`` does not halve its output error (``HALF``),
    else that export (with a warning and an export note naming the nodes left in float)."""
    exported, validation = first
    if validation.lowest_cosine >= min_cosine:
        return plan, exported, validation
    again = export(narrow)
    checked = validate(again.model)
    if 1 - checked.lowest_cosine > HALF * (1 - validation.lowest_cosine):
        return plan, exported, validation
    left = [node for node in plan.nodes if node not in narrow.nodes]
    note = (
        f"placement: with Q/DQ around {len(left)} non-compute node(s) the output cosine was "
        f"{validation.lowest_cosine:.4f} (< {min_cosine:g}); with only the compute ops quantized "
        f"it is {checked.lowest_cosine:.4f}, so those nodes stay float: "
        f"{', '.join(left[:5])}{', ...' if len(left) > 5 else ''}"
    )
    log.warning(note)
    again.notes.append(note)
    return narrow, again, checked

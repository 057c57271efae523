"""Activations whose scales the graph computes at run time: the MX formats, where each block's
E8M0 scale comes from that block's own amax (graphs/mx.py). Nothing is captured or calibrated
for them; they get a record (a unit scale the export does not read) for the scales file and the
report, which says so."""

from __future__ import annotations

import dataclasses

import torch

from qcal_export.spec.formats import get_format
from qcal_export.spec.granularity import PerTensor
from qcal_export.spec.plan import Plan
from qcal_export.spec.recipe import TensorSpec
from qcal_export.spec.scales import TensorScales

RUNTIME_NOTE = (
    "not calibrated: the graph computes each block's E8M0 scale at run time from the block's "
    "amax (OCP MX rule)"
)


def is_runtime_scaled(spec: TensorSpec) -> bool:
    """Whether an activation in ``spec``'s format gets its scales in the graph: a
    shared-exponent (MX) format, whose block scales come from each block's own amax."""
    return get_format(spec.format).shared_exponent


def runtime_scaled(plan: Plan) -> list[str]:
    """The planned activations ``is_runtime_scaled``."""
    return [t for t, a in plan.activations.items() if is_runtime_scaled(a.spec)]


def calibrated_part(plan: Plan) -> Plan:
    """``plan`` without the activations ``runtime_scaled`` names: what capture and the
    calibrators see (weights and the Hessian inputs they ask for stay)."""
    skipped = set(runtime_scaled(plan))
    if not skipped:
        return plan
    kept = {t: a for t, a in plan.activations.items() if t not in skipped}
    return dataclasses.replace(plan, activations=kept)


def runtime_scale_records(plan: Plan) -> dict[str, TensorScales]:
    """``runtime_record`` of each ``runtime_scaled`` activation."""
    return {t: runtime_record(t, plan.activations[t].spec) for t in runtime_scaled(plan)}


def runtime_record(name: str, spec: TensorSpec) -> TensorScales:
    """The record of an activation whose scales the graph computes: per tensor, amax 0 (none
    measured), a unit scale and zero point 0 (the export computes the real ones), the note."""
    return TensorScales(
        name=name,
        kind="activation",
        format=spec.format,
        method=spec.method,
        granularity=PerTensor(),
        amax=torch.zeros(()),
        scale=torch.ones(()),
        zero_point=torch.zeros(()),
        options=dict(spec.options),
        notes=[RUNTIME_NOTE],
    )

"""The smoothing step (``--smooth ALPHA``): per-channel activation maxima from one capture pass
over the calibration batches, then ``graphs/smooth`` on the float model; it returns the smoothed
model and its plan, which the run then plans, calibrates and exports in place of the original
(still the reference the output error is measured against; its file is never written)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import torch

from qcal_export.analysis.planned import PlannedModel
from qcal_export.calibrators import MaxCalibrator
from qcal_export.capture.data import DataSource
from qcal_export.capture.onnxruntime import OrtCapture
from qcal_export.errors import DataError
from qcal_export.graphs.smooth import smooth_model, smoothing_groups
from qcal_export.graphs.targets import find_targets
from qcal_export.onnx_io.tensor_types import tensor_types
from qcal_export.spec.formats import INT8
from qcal_export.spec.granularity import PerAxis
from qcal_export.spec.plan import Plan


@dataclass(frozen=True)
class Smoothed:
    """The model to calibrate (smoothed; the input model where nothing was), its plan, and a
    note per smoothed tensor."""

    model: onnx.ModelProto
    plan: Plan
    notes: list[str]


def smooth(
    planned: PlannedModel, source: DataSource | None, alpha: float, max_batches: int | None
) -> Smoothed:
    """Smooth ``planned.model`` on the first ``max_batches`` batches of ``source`` and plan it
    again."""
    if source is None:
        raise DataError("smoothing needs calibration data: pass --data")
    model, plan = planned.model, planned.plan
    groups = smoothing_groups(model)
    quantized = {use.node for a in plan.activations.values() for use in a.uses}
    tensors = sorted(
        t for t, consumers in groups.items() if quantized & {c.node.name for c in consumers}
    )
    if not tensors:
        return Smoothed(
            model, plan, ["smoothing: no quantized MatMul/Gemm with a weight to smooth"]
        )
    types = tensor_types(model)
    nonfinite = planned.recipe.nonfinite
    maxima = {t: MaxCalibrator(INT8, PerAxis(-1), nonfinite=nonfinite) for t in tensors}
    capture = OrtCapture(
        model,
        {t: types[t] for t in tensors},
        providers=planned.providers,
        name=planned.name,
        device_id=planned.device_id,
    )

    def sink(tensor: str, value: torch.Tensor) -> None:
        maxima[tensor].collect(value)

    capture.run(source, sink, tensors=tensors, max_batches=max_batches)
    amax = {t: cal.compute_amax().cpu().numpy() for t, cal in maxima.items() if cal.collected}
    smoothed, notes = smooth_model(model, amax, alpha)
    replanned = find_targets(smoothed, planned.recipe)
    replanned.notes = list(dict.fromkeys([*plan.notes, *replanned.notes]))
    return Smoothed(smoothed, replanned, notes)

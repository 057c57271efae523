"""The pipeline's smoothing step (``--smooth ALPHA``): per-channel activation maxima from one
capture pass over the calibration batches, then ``graphs/smooth`` on the run's float model,
which the rest of the run plans, calibrates and exports in place of the original (still the
reference the output error is measured against; its file is never written)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from qcal_export.calibrators import MaxCalibrator
from qcal_export.capture.onnxruntime import OrtCapture
from qcal_export.errors import DataError
from qcal_export.graphs.smooth import smooth_model, smoothing_groups
from qcal_export.graphs.targets import find_targets
from qcal_export.onnx_io.tensor_types import tensor_types
from qcal_export.spec.formats import INT8
from qcal_export.spec.granularity import PerAxis

if TYPE_CHECKING:
    from qcal_export.pipeline.run import Run


def smooth_run(run: Run, alpha: float, max_batches: int | None) -> list[str]:
    """Smooth ``run.loaded.proto`` and plan it again; returns a note per smoothed tensor."""
    if run.source is None:
        raise DataError("smoothing needs calibration data: pass --data")
    groups = smoothing_groups(run.loaded.proto)
    planned = {use.node for a in run.plan.activations.values() for use in a.uses}
    tensors = sorted(
        t for t, consumers in groups.items() if planned & {c.node.name for c in consumers}
    )
    if not tensors:
        return ["smoothing: no quantized MatMul/Gemm with a weight to smooth"]
    types = tensor_types(run.loaded.proto)
    maxima = {t: MaxCalibrator(INT8, PerAxis(-1), nonfinite=run.recipe.nonfinite) for t in tensors}
    capture = OrtCapture(
        run.loaded.proto,
        {t: types[t] for t in tensors},
        providers=run.providers,
        name=str(run.loaded.path),
        device_id=run.device_id,
    )

    def sink(tensor: str, value: torch.Tensor) -> None:
        maxima[tensor].collect(value)

    capture.run(run.source, sink, tensors=tensors, max_batches=max_batches)
    amax = {t: cal.compute_amax().cpu().numpy() for t, cal in maxima.items() if cal.collected}
    run.loaded.proto, notes = smooth_model(run.loaded.proto, amax, alpha)
    earlier = run.plan.notes
    run.plan = find_targets(run.loaded.proto, run.recipe)
    run.plan.notes = list(dict.fromkeys([*earlier, *run.plan.notes]))
    return notes

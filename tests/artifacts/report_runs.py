"""Reports of real runs on the convgemm model, shared by the report schema and HTML tests:
method auto with smoothing, the per-layer view and a precision target; mse activations; NVFP4
and int4 block-scaled weights (weight-only)."""

from __future__ import annotations

import json
from pathlib import Path

from qcal_export.pipeline.calibrate import calibrate_onnx

RUNS = {
    "auto": dict(
        method="auto", smooth=0.5, layer_view=True, target_cosine=0.99995, holdout_every=2
    ),
    "mse": dict(method="mse", format="int8", activation_format="int8"),
    "nvfp4": dict(format="nvfp4", activation_format="none"),
    "int4": dict(format="int4", weight_method="mse"),
}


def run_report(workdir: Path, out: Path, name: str) -> dict:
    """The JSON report (as written and read back) of run ``name`` of ``RUNS``."""
    path = out / f"{name}.json"
    calibrate_onnx(workdir / "model.onnx", workdir / "data", report=path, **RUNS[name])
    return json.loads(path.read_text())

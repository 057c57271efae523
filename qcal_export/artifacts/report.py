"""The run report's file and its per-tensor rows: what was quantized, how, and what was noted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qcal_export.artifacts.block_grid import block_grid
from qcal_export.files.atomic import write_file
from qcal_export.spec.scales import TensorScales

SCHEMA_VERSION = 1
"""The report's layout (``report_schema.json``): raised when a key changes meaning or goes."""


def tensor_row(s: TensorScales, weight_errors: dict[str, float]) -> dict[str, Any]:
    amax = s.amax.float()
    row = {
        "tensor": s.name,
        "kind": s.kind,
        "format": s.format,
        "method": s.method,
        "granularity": s.granularity.describe(),
        "amax": float(amax.max()),
        "amax_min": float(amax.min()),
        "notes": list(s.notes),
    }
    if s.min is not None and s.max is not None:
        row["min"] = float(s.min.min())
        row["max"] = float(s.max.max())
    if s.global_scale is not None:
        row["global_scale"] = float(s.global_scale)
    if s.name in weight_errors:
        row["weight_rel_error"] = weight_errors[s.name]
    grid = block_grid(s)
    if grid is not None:
        row["block_scales"] = grid
    return row


def save_report(path: str | Path, report: dict[str, Any]) -> Path:
    return write_file(path, json.dumps(report, indent=2) + "\n", "report")

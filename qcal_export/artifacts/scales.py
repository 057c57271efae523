"""The scales file: per calibrated tensor amax (min/max), scale and zero point, in safetensors.

Entries are ``<tensor>.amax``, ``<tensor>.scale``, ``<tensor>.zero_point`` (in the format's
storage dtype) and, for asymmetric formats, ``<tensor>.min`` / ``<tensor>.max``. The header's
``qcal_export`` metadata (JSON) holds format, granularity, method and options per tensor, the
model's checksum and the versions of qcal_export, onnx, onnxruntime and torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qcal_export.atomic import atomic_path
from qcal_export.errors import ScalesError
from qcal_export.formats import get_format
from qcal_export.graphs.qdq import QParams

SCHEMA = "qcal_export.scales/1"


@dataclass
class TensorScales:
    """Calibration result of one tensor; all tensors have the export (ONNX scale) shape.

    ``amax`` is ``max(|min|, |max|)``; asymmetric formats also keep the range ``min`` / ``max``.
    """

    name: str
    kind: Literal["activation", "weight"]
    format: str
    method: str
    axis: int | None
    amax: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    min: torch.Tensor | None = None
    max: torch.Tensor | None = None
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def granularity(self) -> str:
        return "per-tensor" if self.axis is None else f"per-axis({self.axis})"

    def qparams(self) -> QParams:
        return QParams(get_format(self.format), self.scale, self.zero_point, self.axis)


def versions() -> dict[str, str]:
    found = {}
    for dist in ("qcal-export", "onnx", "onnxruntime", "onnxruntime-gpu", "torch"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def save_scales(path: str | Path, scales: dict[str, TensorScales], model_sha256: str) -> Path:
    """Write the scales file atomically; returns its path."""
    tensors: dict[str, torch.Tensor] = {}
    entries = {}
    for name, s in scales.items():
        fmt = get_format(s.format)
        tensors[f"{name}.amax"] = s.amax.float().contiguous()
        tensors[f"{name}.scale"] = s.scale.float().contiguous()
        tensors[f"{name}.zero_point"] = fmt.encode_zero_point(s.zero_point).contiguous()
        if s.min is not None and s.max is not None:
            tensors[f"{name}.min"] = s.min.float().contiguous()
            tensors[f"{name}.max"] = s.max.float().contiguous()
        entries[name] = {
            "kind": s.kind,
            "format": s.format,
            "granularity": s.granularity,
            "axis": s.axis,
            "method": s.method,
            "options": s.options,
            "notes": s.notes,
        }
    header = {
        "schema": SCHEMA,
        "model_sha256": model_sha256,
        "versions": versions(),
        "tensors": entries,
    }
    with atomic_path(path, "scales file") as tmp:
        save_file(
            {k: v.cpu() for k, v in tensors.items()},
            str(tmp),
            metadata={"qcal_export": json.dumps(header)},
        )
    return Path(path)


def load_scales(path: str | Path) -> tuple[dict[str, TensorScales], dict[str, Any]]:
    """Read a scales file: ({tensor: TensorScales}, header); ScalesError names the file."""
    path = Path(path)
    if not path.is_file():
        raise ScalesError(f"scales file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("qcal_export")
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open)
    except (SafetensorError, OSError) as e:
        raise ScalesError(f"{path} is not a readable safetensors file: {e}") from None
    if raw is None:
        raise ScalesError(
            f"{path} has no qcal_export metadata: write it with qcal calibrate --scales"
        )
    try:
        header = json.loads(raw)
        entries = header["tensors"].items()
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ScalesError(f"{path}: qcal_export metadata is malformed ({e!r})") from None
    scales = {}
    for name, entry in entries:
        try:
            scales[name] = TensorScales(
                name=name,
                kind=entry["kind"],
                format=entry["format"],
                method=entry["method"],
                axis=entry["axis"],
                amax=tensors[f"{name}.amax"],
                scale=tensors[f"{name}.scale"],
                zero_point=tensors[f"{name}.zero_point"].float(),
                min=tensors.get(f"{name}.min"),
                max=tensors.get(f"{name}.max"),
                options=entry.get("options", {}),
                notes=entry.get("notes", []),
            )
        except KeyError as e:
            raise ScalesError(f"{path}: tensor {name!r} lacks entry {e}") from None
    return scales, header

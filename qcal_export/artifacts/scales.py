"""The scales file: per calibrated tensor amax (min/max), scale and zero point, in safetensors.

Entries are ``<tensor>.amax``, ``<tensor>.scale``, ``<tensor>.zero_point`` (in the format's
storage dtype), for asymmetric formats ``<tensor>.min`` / ``<tensor>.max`` and, for two-level
formats (nvfp4), ``<tensor>.global_scale``. The header's ``qcal_export`` metadata (JSON) holds
format, granularity, method and options per tensor, the model's checksum and the versions of
qcal_export, onnx, onnxruntime and torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from qcal_export.atomic import write_file
from qcal_export.errors import ScalesError
from qcal_export.formats import NVFP4, get_format
from qcal_export.granularity import Granularity, granularity_from_dict
from qcal_export.graphs.qdq import QParams

SCHEMA = "qcal_export.scales/2"


@dataclass
class TensorScales:
    """Calibration result of one tensor; all tensors have the export (ONNX scale) shape.

    ``amax`` is ``max(|min|, |max|)``; asymmetric formats also keep the range ``min`` / ``max``.
    NVFP4 weights: ``amax`` per block, ``scale`` the FP8 block scales (float32 values) and
    ``global_scale`` the FP32 global scale; NVFP4 activations: ``amax`` the global amax and
    ``scale`` = ``global_scale`` (block scales are computed in the graph).
    """

    name: str
    kind: Literal["activation", "weight"]
    format: str
    method: str
    granularity: Granularity
    amax: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    min: torch.Tensor | None = None
    max: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def axis(self) -> int | None:
        return getattr(self.granularity, "axis", None)

    def fake_quant_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight (graph shape) as the exported DequantizeLinear chain gives it, float32."""
        shape = tuple(weight.shape)
        scale = self.granularity.expand(self.scale, shape)
        if self.global_scale is not None:
            return NVFP4.fake_quant_blocks(weight, NVFP4.effective_scales(scale, self.global_scale))
        zero_point = self.granularity.expand(self.zero_point, shape)
        return get_format(self.format).fake_quant(weight, scale, zero_point)

    def qparams(self) -> QParams:
        return QParams(
            get_format(self.format),
            self.scale,
            self.zero_point,
            self.granularity,
            self.global_scale,
        )


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
        if s.global_scale is not None:
            tensors[f"{name}.global_scale"] = s.global_scale.float().clone()
        entries[name] = {
            "kind": s.kind,
            "format": s.format,
            "granularity": s.granularity.to_dict(),
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
    content = save(
        {k: v.cpu() for k, v in tensors.items()}, metadata={"qcal_export": json.dumps(header)}
    )
    return write_file(path, content, "scales file")


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
                granularity=granularity_from_dict(entry["granularity"]),
                amax=tensors[f"{name}.amax"],
                scale=tensors[f"{name}.scale"],
                zero_point=tensors[f"{name}.zero_point"].float(),
                min=tensors.get(f"{name}.min"),
                max=tensors.get(f"{name}.max"),
                global_scale=tensors.get(f"{name}.global_scale"),
                options=entry.get("options", {}),
                notes=entry.get("notes", []),
            )
        except KeyError as e:
            raise ScalesError(f"{path}: tensor {name!r} lacks entry {e}") from None
        except (TypeError, ValueError) as e:
            raise ScalesError(f"{path}: tensor {name!r} has a malformed granularity: {e}") from None
    return scales, header

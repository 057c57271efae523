"""The scales file: per calibrated tensor amax (min/max), scale and zero point, in safetensors.

Entries are ``<tensor>.amax``, ``<tensor>.scale``, ``<tensor>.zero_point`` (in the format's
storage dtype), for asymmetric formats ``<tensor>.min`` / ``<tensor>.max`` and, for two-level
formats (nvfp4), ``<tensor>.global_scale``. The header's ``qcal_export`` metadata (JSON) holds
format, granularity, method and options per tensor, the model's checksum and the versions of
qcal_export, onnx, onnxruntime and torch.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from qcal_export.errors import ScalesError
from qcal_export.files.atomic import write_file
from qcal_export.spec.formats import FORMATS, Format, get_format
from qcal_export.spec.granularity import Granularity, PerBlock, granularity_from_dict
from qcal_export.spec.scales import TensorScales

SCHEMA = "qcal_export.scales/2"


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
    """Read a scales file: ({tensor: TensorScales}, header); ScalesError names the file, and
    the tensor whose entries are missing or hold values no export can use."""
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
    scales = {name: _tensor_scales(path, name, entry, tensors) for name, entry in entries}
    return scales, header


def _tensor_scales(
    path: Path, name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> TensorScales:
    """One tensor's scales from its header ``entry`` and the file's ``tensors``; ScalesError
    names the file and the tensor."""
    where = f"{path}: tensor {name!r}"
    try:
        fmt, granularity = entry["format"], granularity_from_dict(entry["granularity"])
    except KeyError as e:
        raise ScalesError(f"{where} lacks entry {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise ScalesError(f"{where} has a malformed granularity: {e}") from None
    if fmt not in FORMATS:
        raise ScalesError(f"{where} has format {fmt!r}, not one of {sorted(FORMATS)}")
    try:
        check_values(where, fmt, granularity, name, tensors)
        return TensorScales(
            name=name,
            kind=entry["kind"],
            format=fmt,
            method=entry["method"],
            granularity=granularity,
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
        raise ScalesError(f"{where} lacks entry {e}") from None


def check_values(
    where: str,
    fmt_name: str,
    granularity: Granularity,
    name: str,
    tensors: dict[str, torch.Tensor],
) -> None:
    """ScalesError (prefixed ``where``) for entries of tensor ``name`` that no export can use:
    scales (and global scales) that are not positive finite float32, an amax, min or max that
    is not finite float32 of the scale's shape, a zero point off the format's integer grid.

    KeyError for a missing entry; shapes against the model are ``check_scales_match``'s.
    """
    fmt = get_format(fmt_name)
    scale = tensors[f"{name}.scale"]
    _check_float(where, "scale", scale, positive=True)
    for key in ("amax", "min", "max"):
        value = tensors[f"{name}.{key}"] if key == "amax" else tensors.get(f"{name}.{key}")
        if value is None:
            continue
        _check_float(where, key, value, positive=False)
        if value.shape != scale.shape:
            raise ScalesError(
                f"{where}: {key} has shape {list(value.shape)}, its scale {list(scale.shape)}"
            )
    zero_point = tensors[f"{name}.zero_point"]
    if zero_point.shape != scale.shape:
        raise ScalesError(
            f"{where}: zero_point has shape {list(zero_point.shape)}, its scale {list(scale.shape)}"
        )
    _check_zero_point(where, fmt, zero_point)
    if fmt.two_level:
        global_scale = tensors[f"{name}.global_scale"]
        _check_float(where, "global_scale", global_scale, positive=True)
        if global_scale.dim() != 0:
            raise ScalesError(
                f"{where}: global_scale has shape {list(global_scale.shape)}, not [] (one per "
                "tensor)"
            )
        blocks = isinstance(granularity, PerBlock)
        if blocks and bool((scale > fmt.scale_max).any() | (scale < fmt.scale_min).any()):
            raise ScalesError(
                f"{where}: {fmt.name} block scales must lie in [{fmt.scale_min:g}, "
                f"{fmt.scale_max:g}] (FP8 E4M3), found {float(scale.min()):g} to "
                f"{float(scale.max()):g}"
            )


def _check_float(where: str, field: str, value: torch.Tensor, *, positive: bool) -> None:
    if value.dtype != torch.float32:
        raise ScalesError(f"{where}: {field} is {_dtype(value)}, not float32")
    bad = ~torch.isfinite(value)
    if positive:
        bad |= value <= 0
    if bool(bad.any()):
        found = value[bad][0].item()
        what = "positive finite" if positive else "finite"
        raise ScalesError(
            f"{where}: {field} must be {what}, found {found!r} ({int(bad.sum())} of "
            f"{value.numel()}): recalibrate, or fix the file"
        )


def _check_zero_point(where: str, fmt: Format, zero_point: torch.Tensor) -> None:
    """Integer-valued, in the format's range, and 0 for symmetric formats (fp8, nvfp4: the
    calibrators assume it)."""
    if zero_point.dtype == torch.bool or zero_point.is_complex():
        raise ScalesError(f"{where}: zero_point is {_dtype(zero_point)}, not a number type")
    values = zero_point.double()
    if fmt.symmetric:
        low = high = 0.0
    else:
        low, high = fmt.qmin, fmt.qmax
    bad = ~torch.isfinite(values) | (values != values.round()) | (values < low) | (values > high)
    if bool(bad.any()):
        found = values[bad][0].item()
        allowed = "0 (symmetric format)" if fmt.symmetric else f"integers in [{low}, {high}]"
        raise ScalesError(
            f"{where}: zero_point {found:g} does not fit {fmt.name}: it takes {allowed}"
        )


def _dtype(value: torch.Tensor) -> str:
    return str(value.dtype).removeprefix("torch.")

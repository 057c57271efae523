"""TensorRT's version as the number its calibration caches carry (``TRT-<number>-...``)."""

from __future__ import annotations

import re

from qcal_export.errors import RecipeError

DEFAULT_TRT_VERSION = "10.3.0"


def trt_version_number(version: str) -> int:
    """TensorRT's ``NV_TENSORRT_VERSION`` of ``"major.minor.patch"``: ``major * 1000 + minor *
    100 + patch`` before TensorRT 10 (``"8.6.1"`` -> 8601), ``major * 10000 + minor * 100 +
    patch`` since (``"10.3.0"`` -> 100300); RecipeError naming the option for anything else."""
    found = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", str(version))
    major, minor, patch = (int(part) for part in found.groups()) if found else (0, 0, 0)
    if major < 7 or minor >= (10 if major < 10 else 100) or patch >= 100:
        raise RecipeError(
            f"--trt-calib-version must be a TensorRT version as major.minor.patch (7.0.0 or "
            f"later, e.g. {DEFAULT_TRT_VERSION}), not {version!r}"
        )
    return (major * 1000 if major < 10 else major * 10000) + minor * 100 + patch

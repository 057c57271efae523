"""Activation ranges as the calibration tables TensorRT and ONNX Runtime's TensorRT EP read.

TensorRT's calibration cache (``tensorrt`` form) is text: a first line
``TRT-<version>-EntropyCalibration2``, then one ``<tensor>: <scale>`` line per tensor, the
scale ``amax / 127`` as the 8 hex digits of its float32 bits read as one integer (most
significant first). The format is defined by what TensorRT writes and reads; its readers
outside TensorRT show it: ONNX Runtime's TensorRT EP (``ReadDynamicRange`` in
onnxruntime/core/providers/tensorrt/tensorrt_execution_provider_utils.h parses the hex with
``strtoul(.., 16)`` as IEEE-754 bits and takes ``scale * 127`` as the dynamic range), and
NVIDIA TAO's exporters write ``hex(bits of float32(amax / 127.0))``. ``<version>`` is
TensorRT's ``NV_TENSORRT_VERSION`` (``spec.trt_version``: ``TRT-8601``, ``TRT-100300``);
TensorRT refuses a cache of another version. ONNX Runtime's TensorRT EP reads its own
flatbuffers ``TrtTable`` (``ort-flatbuffers``: tensor name -> amax as decimal text) unless
told to read TensorRT's cache (``trt_int8_use_native_calibration_table``); ``ort-json`` is the
JSON file the same writer, ``onnxruntime.quantization.write_calibration_table``, puts beside
it. Both ORT forms are written by that public function of onnxruntime.

Only per-tensor symmetric int8 activations have such a range: other formats are refused.
"""

from __future__ import annotations

import json
import re
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from qcal_export.errors import RecipeError, ScalesError
from qcal_export.files.atomic import write_file
from qcal_export.spec.choices import CalibTableForm
from qcal_export.spec.granularity import PerTensor
from qcal_export.spec.plan import Plan
from qcal_export.spec.scales import TensorScales
from qcal_export.spec.trt_version import DEFAULT_TRT_VERSION, trt_version_number

OPTION = "--trt-calib-table"
ALGORITHM = "EntropyCalibration2"
ORT_FILES = {
    CalibTableForm.ORT_FLATBUFFERS: "calibration.flatbuffers",
    CalibTableForm.ORT_JSON: "calibration.json",
}
"""The file of each ORT form in the directory ``write_calibration_table`` writes into."""


def check_table_plan(plan: Plan, scales: Mapping[str, TensorScales] | None = None) -> None:
    """RecipeError naming the option unless every planned activation is per-tensor symmetric
    int8 (and there is one); with ``scales``, each one's calibrated format too."""
    if not plan.activations:
        raise RecipeError(
            f"{OPTION}: this run quantizes no activations (weight-only formats or "
            "--activation-format none): a calibration table holds int8 activation ranges"
        )
    for tensor, activation in plan.activations.items():
        fmt = activation.spec.format
        if scales is not None and tensor in scales:
            fmt = scales[tensor].format
        if fmt != "int8":
            raise RecipeError(
                f"{OPTION}: activation {tensor!r} is {fmt}; TensorRT's calibration table "
                "holds per-tensor symmetric int8 ranges only: calibrate int8 activations "
                "(--activation-format int8)"
            )


def table_amax(plan: Plan, scales: Mapping[str, TensorScales]) -> dict[str, np.float32]:
    """Each quantized activation's float32 amax, by tensor name (activations quantized with
    another activation's scale included, under their own name), sorted by name."""
    check_table_plan(plan, scales)
    amax = {tensor: _int8_amax(scales[tensor]) for tensor in plan.activations}
    for shared in plan.shared.values():
        if shared.source in amax:
            amax[shared.tensor] = amax[shared.source]
    for tensor in amax:
        if "\n" in tensor or "\r" in tensor:
            raise ScalesError(f"{OPTION}: tensor name {tensor!r} holds a line break")
    return dict(sorted(amax.items()))


def _int8_amax(entry: TensorScales) -> np.float32:
    if entry.format != "int8" or entry.granularity != PerTensor():
        raise ScalesError(
            f"{OPTION}: activation {entry.name!r} has {entry.format} "
            f"{entry.granularity.describe()} scales; the table needs per-tensor int8 ones"
        )
    return np.float32(entry.amax.float().item())


def trt_scale(amax: np.float32) -> np.float32:
    """TensorRT's scale of an int8 range: ``amax / 127`` in float32 (the QDQ model's scale)."""
    return np.float32(amax) / np.float32(127)


def trt_cache_text(amax: Mapping[str, np.float32], version: str = DEFAULT_TRT_VERSION) -> str:
    """TensorRT's calibration cache of ``amax`` (tensor name -> float32 amax)."""
    lines = [f"TRT-{trt_version_number(version)}-{ALGORITHM}"]
    for tensor, value in amax.items():
        bits = struct.unpack(">I", struct.pack(">f", trt_scale(value)))[0]
        lines.append(f"{tensor}: {bits:08x}")
    return "\n".join(lines) + "\n"


def parse_trt_cache(text: str, origin: str) -> tuple[int, dict[str, np.float32]]:
    """The version number and the float32 scales (tensor name -> scale) of a TensorRT
    calibration cache; ScalesError naming ``origin`` for a malformed one."""
    lines = text.splitlines()
    header = re.fullmatch(r"TRT-(\d+)-(\w+)", lines[0] if lines else "")
    if header is None:
        raise ScalesError(f"{origin}: not a TensorRT calibration cache (no TRT-<version> line)")
    scales = {}
    for number, line in enumerate(lines[1:], start=2):
        tensor, colon, value = line.rpartition(": ")
        if not colon or re.fullmatch(r"[0-9a-fA-F]{1,8}", value) is None:
            raise ScalesError(f"{origin} line {number}: not '<tensor>: <hex scale>': {line!r}")
        scales[tensor] = np.float32(struct.unpack(">f", struct.pack(">I", int(value, 16)))[0])
    return int(header[1]), scales


def ort_table_bytes(amax: Mapping[str, np.float32], form: CalibTableForm) -> bytes:
    """The ``form`` file (flatbuffers or JSON) onnxruntime's ``write_calibration_table``
    writes for ``amax`` as symmetric ranges ``[-amax, amax]``."""
    from onnxruntime.quantization import write_calibration_table
    from onnxruntime.quantization.calibrate import TensorData

    cache = {
        tensor: TensorData(lowest=-np.float32(value), highest=np.float32(value))
        for tensor, value in amax.items()
    }
    with tempfile.TemporaryDirectory(prefix="qcal-calib-") as folder:
        write_calibration_table(cache, dir=folder)
        return (Path(folder) / ORT_FILES[form]).read_bytes()


def parse_ort_json(text: str) -> dict[str, np.float32]:
    """The amax (``highest``) of each tensor of an ``ort-json`` table."""
    return {tensor: np.float32(entry["highest"]) for tensor, entry in json.loads(text).items()}


def write_calib_table(
    path: str | Path,
    plan: Plan,
    scales: Mapping[str, TensorScales],
    form: str = CalibTableForm.TENSORRT,
    version: str = DEFAULT_TRT_VERSION,
) -> Path:
    """Write the activations' ranges as the calibration table ``form`` to ``path``
    (atomically); returns the path."""
    amax = table_amax(plan, scales)
    table = CalibTableForm.parse(form, "--trt-calib-form")
    if table == CalibTableForm.TENSORRT:
        content: bytes | str = trt_cache_text(amax, version)
    else:
        content = ort_table_bytes(amax, table)
    return write_file(path, content, "calibration table")

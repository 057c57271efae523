"""Calibration tables (``trt_calib_table``): TensorRT's cache text and ONNX Runtime's flatbuffers
and JSON tables, written then read back (the cache by our parser and as ORT's TensorRT EP reads
it, the ORT tables by onnxruntime's own flatbuffers classes and TensorData), compared with the
amax and scale of the scales file bit for bit.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from onnxruntime.quantization.calibrate import TensorData
from onnxruntime.quantization.CalTableFlatBuffers.TrtTable import TrtTable
from safetensors.numpy import load_file

from qcal_export import calibrate_onnx
from qcal_export.artifacts.calib_table import (
    ort_table_bytes,
    parse_ort_json,
    parse_trt_cache,
    trt_cache_text,
    trt_scale,
)
from qcal_export.errors import RecipeError, ScalesError
from qcal_export.spec.choices import CalibTableForm
from qcal_export.spec.trt_version import trt_version_number

AMAX = {
    "x": np.float32(3.8994217),
    "/conv/Conv_output_0": np.float32(127.0),
    "input:0": np.float32(1.0),
    "tiny": np.float32(1e-30),
    "huge": np.float32(1e30),
    "with space": np.float32(0.0123),
}


def bits(value) -> int:
    return int(np.float32(value).view(np.uint32))


def flatbuffer_table(data: bytes) -> dict[str, str]:
    """Tensor name -> value text, read with onnxruntime's generated flatbuffers classes."""
    table = TrtTable.GetRootAsTrtTable(data, 0)
    entries = (table.Dict(i) for i in range(table.DictLength()))
    return {e.Key().decode(): e.Value().decode() for e in entries}


@pytest.mark.parametrize(
    ("version", "number"), [("7.1.3", 7103), ("8.6.1", 8601), ("10.3.0", 100300)]
)
def test_trt_version_numbers(version, number):
    """NV_TENSORRT_VERSION: 7103 is the header of ORT's documented example cache."""
    assert trt_version_number(version) == number


@pytest.mark.parametrize("version", ["6.0.1", "8.10.0", "10.3", "ten", "10.3.0.1", "10.3.100"])
def test_bad_trt_versions_are_refused(version):
    with pytest.raises(RecipeError, match=r"^--trt-calib-version must be a TensorRT version"):
        trt_version_number(version)


def test_trt_cache_by_hand():
    """amax 127 is scale 1.0 (0x3f800000); amax 1 is float32(1/127), 0x3c010204, as the
    float64 quotient rounded to float32 gives it."""
    text = trt_cache_text({"a": np.float32(127.0), "b": np.float32(1.0)}, "8.6.1")
    assert text == "TRT-8601-EntropyCalibration2\na: 3f800000\nb: 3c010204\n"
    assert bits(np.float64(1.0) / 127.0) == 0x3C010204


def test_a_cache_tensorrt_wrote_parses():
    """Lines of a cache TensorRT 7.2.2's MNIST sample wrote (quoted in a public tutorial):
    its input ``data`` holds pixels scaled to [0, 1], so amax = 127 * scale is just under 1."""
    text = "TRT-7202-EntropyCalibration2\ndata: 3c008912\nconv1: 3c60dd38\n"
    version, scales = parse_trt_cache(text, "mnist.cache")
    assert version == trt_version_number("7.2.2") == 7202
    assert 0.99 < float(scales["data"]) * 127 < 1.0
    assert trt_cache_text({"data": scales["data"] * np.float32(127)}, "7.2.2") == (
        "TRT-7202-EntropyCalibration2\ndata: 3c008912\n"
    )


def test_trt_cache_round_trip():
    """Written then parsed: each scale is amax / 127 in float32, bit for bit; the dynamic range
    ORT's TensorRT EP derives from it (float32 scale * 127) is amax within one float32 ulp."""
    version, scales = parse_trt_cache(trt_cache_text(AMAX), "cache")
    assert version == 100300
    assert list(scales) == list(AMAX)
    for tensor, amax in AMAX.items():
        scale = scales[tensor]
        assert bits(scale) == bits(trt_scale(amax)) == bits(np.float64(amax) / 127.0)
        dynamic_range = np.float32(scale) * np.float32(127.0)
        assert abs(float(dynamic_range) - float(amax)) <= float(np.spacing(amax))


def test_trt_cache_hex_is_the_big_endian_float32():
    text = trt_cache_text({"t": np.float32(2.5)})
    hex_scale = text.splitlines()[1].split(": ")[1]
    assert bytes.fromhex(hex_scale) == struct.pack(">f", np.float32(2.5) / np.float32(127))


@pytest.mark.parametrize(
    "text", ["", "calibration\nx: 3f800000\n", "TRT-8601-EntropyCalibration2\nx 3f800000\n"]
)
def test_malformed_caches_are_refused(text):
    with pytest.raises(ScalesError, match=r"^cache"):
        parse_trt_cache(text, "cache")


def test_ort_flatbuffers_round_trip():
    """onnxruntime's writer, read back by onnxruntime's TrtTable: each value is the amax as
    text that parses (as ORT's EP does with std::stof) to the same float32."""
    table = flatbuffer_table(ort_table_bytes(AMAX, CalibTableForm.ORT_FLATBUFFERS))
    assert set(table) == set(AMAX)
    for tensor, amax in AMAX.items():
        assert bits(np.float32(table[tensor])) == bits(amax)


def test_ort_json_round_trip():
    text = ort_table_bytes(AMAX, CalibTableForm.ORT_JSON).decode()
    parsed = parse_ort_json(text)
    assert {t: bits(v) for t, v in parsed.items()} == {t: bits(v) for t, v in AMAX.items()}
    for tensor, entry in json.loads(text).items():
        data = TensorData.from_dict(entry)
        assert bits(data.highest) == bits(AMAX[tensor]) == bits(-data.lowest)


@pytest.fixture(scope="module")
def tables(workdir, tmp_path_factory) -> dict[str, Path]:
    """The conftest model calibrated with int8 activations: its scales file and one table of
    each form (each run writes both files)."""
    out = tmp_path_factory.mktemp("tables")
    paths = {}
    for form in CalibTableForm.values():
        paths[form] = out / f"table.{form}"
        result = calibrate_onnx(
            workdir / "model.onnx",
            workdir / "data",
            activation_format="int8",
            scales=out / f"{form}.safetensors",
            trt_calib_table=paths[form],
            trt_calib_form=form,
            trt_calib_version="8.6.1",
            validate_batches=0,
        )
        assert result.calib_table_path == paths[form]
        assert result.report["trt_calib_table"] == str(paths[form])
    paths["scales"] = out / "tensorrt.safetensors"
    return paths


def activation_entries(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """The scales file's activation entries: tensor -> {amax, scale}."""
    values = load_file(str(path))
    names = {key.rsplit(".", 1)[0] for key in values}
    activations = {"x", "/conv/Conv_output_0", "/Flatten_output_0"} & names
    return {t: {"amax": values[f"{t}.amax"], "scale": values[f"{t}.scale"]} for t in activations}


def test_tables_match_the_scales_file(tables):
    """Per tensor: the cache's scale is the scales file's scale and the ORT tables' amax its
    amax, bit for bit (each form from its own run; calibration is deterministic)."""
    entries = activation_entries(tables["scales"])
    assert set(entries) == {"x", "/conv/Conv_output_0", "/Flatten_output_0"}
    version, scales = parse_trt_cache(tables["tensorrt"].read_text(), "cache")
    assert version == 8601 and set(scales) == set(entries)
    flat = flatbuffer_table(tables["ort-flatbuffers"].read_bytes())
    parsed_json = parse_ort_json(tables["ort-json"].read_text())
    for tensor, entry in entries.items():
        assert bits(scales[tensor]) == bits(entry["scale"])
        assert bits(np.float32(flat[tensor])) == bits(entry["amax"])
        assert bits(parsed_json[tensor]) == bits(entry["amax"])


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"format": "fp8"}, r"activation 'x' is fp8; TensorRT's calibration table holds"),
        ({}, r"activation 'x' is uint8"),
        ({"format": "int4"}, r"this run quantizes no activations"),
    ],
)
def test_other_formats_are_refused_before_anything_runs(workdir, tmp_path, options, pattern):
    with pytest.raises(RecipeError, match=rf"^--trt-calib-table: .*{pattern}"):
        calibrate_onnx(
            workdir / "model.onnx",
            workdir / "data",
            output=tmp_path / "q.onnx",
            trt_calib_table=tmp_path / "t.cache",
            **options,
        )
    assert list(tmp_path.iterdir()) == []

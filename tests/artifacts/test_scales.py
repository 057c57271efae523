"""The safetensors scales file: round trip, stored dtypes, metadata, errors and atomic writes.

Scales are computed by the formats themselves from real ranges; the file is read back both
with ``load_scales`` and independently with ``safetensors.safe_open``. Values a file must not
hold are test_scales_values.py's.
"""

from __future__ import annotations

import json
import os
import re

import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from scales_cases import SHA, calibrated, stored

import qcal_export
from qcal_export.artifacts.scales import SCHEMA, load_scales, save_scales
from qcal_export.errors import OutputError, ScalesError
from qcal_export.spec.formats import get_format
from qcal_export.spec.scales import TensorScales


def assert_same_scales(got: TensorScales, want: TensorScales) -> None:
    assert (got.name, got.kind, got.format, got.method, got.axis) == (
        want.name,
        want.kind,
        want.format,
        want.method,
        want.axis,
    )
    assert got.granularity == want.granularity
    for field in ("amax", "scale", "zero_point"):
        g, w = getattr(got, field), getattr(want, field)
        assert g.dtype == torch.float32, field
        assert g.shape == w.shape, field
        assert torch.equal(g, w.float()), field
    for field in ("min", "max"):
        g, w = getattr(got, field), getattr(want, field)
        if w is None:
            assert g is None, field
        else:
            assert torch.equal(g, w), field
    assert got.options == want.options
    assert got.notes == want.notes


CASES = {
    "int8-per-tensor": dict(fmt_name="int8"),
    "int8-per-axis": dict(fmt_name="int8", axis=0, kind="weight"),
    "int8-per-last-axis-mse": dict(fmt_name="int8", axis=1, kind="weight", method="mse"),
    "uint8-per-tensor": dict(fmt_name="uint8", seed=3),
    "uint8-per-axis": dict(fmt_name="uint8", axis=0, kind="weight", seed=4),
    "fp8-per-tensor": dict(fmt_name="fp8", seed=7),
    "fp8-per-axis": dict(fmt_name="fp8", axis=0, kind="weight", seed=5),
}
STORAGE = {"int8": torch.int8, "uint8": torch.uint8, "fp8": torch.float8_e4m3fn}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(tmp_path, case):
    want = calibrated("/block.0/fc/MatMul_output_0", **CASES[case])
    path = save_scales(tmp_path / "scales.safetensors", {want.name: want}, SHA)
    assert path == tmp_path / "scales.safetensors"
    scales, _ = load_scales(path)
    assert list(scales) == [want.name]
    assert_same_scales(scales[want.name], want)
    # the loaded scales drive export as the originals do
    q = scales[want.name].qparams()
    assert q.fmt is get_format(want.format)
    assert q.granularity == want.granularity
    assert torch.equal(q.scale, want.scale)


@pytest.mark.parametrize("case", list(CASES))
def test_stored_dtypes_and_names(tmp_path, case):
    want = calibrated("t", **CASES[case])
    save_scales(tmp_path / "s.safetensors", {"t": want}, SHA)
    tensors, _ = stored(tmp_path / "s.safetensors")
    expected = {"t.amax", "t.scale", "t.zero_point"}
    if want.min is not None:
        expected |= {"t.min", "t.max"}
    assert set(tensors) == expected
    assert tensors["t.amax"].dtype == torch.float32
    assert tensors["t.scale"].dtype == torch.float32
    assert tensors["t.zero_point"].dtype == STORAGE[want.format]
    shape = {None: (), 0: (6,), 1: (4,)}[want.axis]
    for entry in expected:
        assert tuple(tensors[entry].shape) == shape, entry
    assert torch.equal(tensors["t.zero_point"].float(), want.zero_point)


def test_uint8_keeps_range_and_integer_zero_point(tmp_path):
    want = calibrated("a", "uint8", seed=3)
    assert float(want.min) < 0 < float(want.max)  # a real asymmetric range
    save_scales(tmp_path / "s.safetensors", {"a": want}, SHA)
    tensors, _ = stored(tmp_path / "s.safetensors")
    assert tensors["a.zero_point"].dtype == torch.uint8
    zero_point = int(tensors["a.zero_point"])
    # zero_point = round(qmin - min / scale), within [0, 255] and not trivially 0
    expected = round(0 - float(want.min) / float(want.scale))
    assert zero_point == expected and 0 < zero_point < 255
    assert float(tensors["a.min"]) == float(want.min)
    assert float(tensors["a.max"]) == float(want.max)
    loaded, _ = load_scales(tmp_path / "s.safetensors")
    assert float(loaded["a"].zero_point) == float(zero_point)


def test_fp8_zero_point_is_float8_e4m3fn(tmp_path):
    want = calibrated("w", "fp8", axis=0, kind="weight")
    save_scales(tmp_path / "s.safetensors", {"w": want}, SHA)
    tensors, _ = stored(tmp_path / "s.safetensors")
    assert tensors["w.zero_point"].dtype == torch.float8_e4m3fn
    assert tensors["w.zero_point"].shape == (6,)
    assert torch.equal(tensors["w.zero_point"].float(), torch.zeros(6))
    assert torch.allclose(tensors["w.scale"] * 448.0, want.amax, rtol=1e-6, atol=0)


def test_metadata_holds_versions_checksum_and_per_tensor_entries(tmp_path):
    scales = {
        s.name: s
        for s in (
            calibrated("x", "int8"),
            calibrated("w", "int8", axis=0, kind="weight", method="mse"),
            calibrated("u", "uint8", seed=3),
        )
    }
    save_scales(tmp_path / "s.safetensors", scales, SHA)
    _, raw_header = stored(tmp_path / "s.safetensors")
    _, header = load_scales(tmp_path / "s.safetensors")
    assert header == raw_header
    assert header["schema"] == SCHEMA
    assert header["model_sha256"] == SHA
    versions = header["versions"]
    assert versions["qcal-export"] == qcal_export.__version__
    assert versions["onnx"] == onnx.__version__
    assert versions["onnxruntime"] == ort.__version__
    assert versions["torch"] == torch.__version__
    entries = header["tensors"]
    assert list(entries) == ["x", "w", "u"]
    assert entries["x"] == {
        "kind": "activation",
        "format": "int8",
        "granularity": {"type": "per-tensor"},
        "method": "max",
        "options": {},
        "notes": [],
    }
    assert entries["w"]["granularity"] == {"type": "per-axis", "axis": 0}
    assert entries["w"]["method"] == "mse"
    assert entries["w"]["options"] == {"start": 0.5, "stop": 2.0, "step": 0.25}
    assert entries["u"]["format"] == "uint8"


# ---- errors ---------------------------------------------------------------------------------


def test_non_safetensors_file_names_the_path(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(range(200)))
    with pytest.raises(
        ScalesError, match=rf"^{re.escape(str(path))} is not a readable safetensors file"
    ):
        load_scales(path)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(
        ScalesError, match=rf"^{re.escape(str(empty))} is not a readable safetensors file"
    ):
        load_scales(empty)


def test_safetensors_without_our_metadata_names_the_path(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"x.amax": torch.ones(())}, str(path), metadata={"format": "pt"})
    with pytest.raises(ScalesError, match=rf"^{re.escape(str(path))} has no qcal_export metadata"):
        load_scales(path)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "scales.safetensors"
    with pytest.raises(ScalesError, match=rf"^scales file {re.escape(str(path))} does not exist"):
        load_scales(path)
    with pytest.raises(ScalesError, match="does not exist"):
        load_scales(tmp_path)  # a directory is not a scales file


def test_entry_without_its_tensor_names_file_and_tensor(tmp_path):
    want = calibrated("w", "int8", axis=0, kind="weight")
    save_scales(tmp_path / "s.safetensors", {"w": want}, SHA)
    tensors, header = stored(tmp_path / "s.safetensors")
    del tensors["w.scale"]
    save_file(
        tensors, str(tmp_path / "cut.safetensors"), metadata={"qcal_export": json.dumps(header)}
    )
    with pytest.raises(ScalesError, match=r"cut\.safetensors: tensor 'w' lacks entry 'w\.scale'"):
        load_scales(tmp_path / "cut.safetensors")


@pytest.mark.parametrize(
    "metadata", ["{not json", '{"schema": "qcal_export.scales/1"}'], ids=["not-json", "no-tensors"]
)
def test_corrupt_metadata_is_a_scales_error_naming_the_path(tmp_path, metadata):
    """Metadata that is not JSON, or JSON without the tensor entries, is a bad scales file."""
    path = tmp_path / "bad.safetensors"
    save_file({"w.amax": torch.ones(())}, str(path), metadata={"qcal_export": metadata})
    with pytest.raises(ScalesError, match=re.escape(str(path))):
        load_scales(path)


# ---- atomic writes --------------------------------------------------------------------------


def test_write_leaves_only_the_file_and_replaces_an_old_one(tmp_path):
    path = tmp_path / "scales.safetensors"
    save_scales(path, {"a": calibrated("a", "int8")}, SHA)
    assert os.listdir(tmp_path) == ["scales.safetensors"]
    save_scales(path, {"b": calibrated("b", "fp8", seed=2)}, "f" * 64)
    assert os.listdir(tmp_path) == ["scales.safetensors"]
    scales, header = load_scales(path)
    assert list(scales) == ["b"] and header["model_sha256"] == "f" * 64


def test_missing_directory_raises_output_error_and_writes_nothing(tmp_path):
    target = tmp_path / "missing" / "scales.safetensors"
    with pytest.raises(OutputError, match=r"scales file .*directory .*missing does not exist"):
        save_scales(target, {"a": calibrated("a", "int8")}, SHA)
    assert os.listdir(tmp_path) == []


def test_directory_as_target_raises_output_error(tmp_path):
    with pytest.raises(OutputError, match="is a directory: give a file name"):
        save_scales(tmp_path, {"a": calibrated("a", "int8")}, SHA)
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "scales.safetensors"
    save_scales(path, {"a": calibrated("a", "int8")}, SHA)
    before = path.read_bytes()
    broken = calibrated("b", "int8")
    broken.scale = torch.empty((), device="meta")  # cannot be copied out: fails mid-write
    with pytest.raises((NotImplementedError, RuntimeError)):
        save_scales(path, {"b": broken}, SHA)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["scales.safetensors"]

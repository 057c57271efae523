"""``qcal calibrate`` with ``--int4-layout matmulnbits`` and ``--trt-calib-table``: good runs
write what they say, bad input is one ``qcal: error:`` line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from error_lines import assert_one_error_line, good
from mlp import make_mlp

from qcal_export.artifacts.calib_table import parse_trt_cache
from qcal_export.cli import main


def test_matmulnbits_run_validates_in_ort(tmp_path, capsys):
    """The written model holds MatMulNBits, validated in ORT (default and optimizations off)."""
    root = make_mlp(tmp_path, seq=True)
    out = tmp_path / "out"
    out.mkdir()
    argv = [str(root / "mlp.onnx"), "--data", str(root / "data"), "--format", "int4"]
    argv += ["--int4-layout", "matmulnbits", "-o", str(out / "q.onnx")]
    argv += ["--report", str(out / "r.json"), "--validate-batches", "2"]
    assert main(["calibrate", *argv]) == 0
    model = onnx.load(out / "q.onnx")
    assert [n.op_type for n in model.graph.node].count("MatMulNBits") == 3
    report = json.loads((out / "r.json").read_text())
    assert report["export_notes"] == []
    assert report["validation"]["runtime_issue"] is None
    assert report["verdict"]["status"] == "pass"
    assert "wrote" in capsys.readouterr().out


def test_calib_table_run_writes_the_cache(workdir, tmp_path, capsys):
    table = tmp_path / "model.cache"
    argv = good(workdir, "--activation-format", "int8", "--trt-calib-table", str(table))
    assert main(["calibrate", *argv, "--trt-calib-version", "8.6.1"]) == 0
    assert f"wrote {table}" in capsys.readouterr().out
    version, scales = parse_trt_cache(table.read_text(), str(table))
    assert version == 8601
    assert set(scales) == {"x", "/conv/Conv_output_0", "/Flatten_output_0"}


# case -> (extra options after the good model and data, pattern of the error line)
BAD = {
    "uint8-activations": (
        lambda t: ["--trt-calib-table", str(t / "t.cache")],
        r"--trt-calib-table: activation 'x' is uint8; .* per-tensor symmetric int8 ranges only",
    ),
    "fp8-activations": (
        lambda t: ["--format", "fp8", "--trt-calib-table", str(t / "t.cache")],
        r"--trt-calib-table: activation 'x' is fp8",
    ),
    "weight-only": (
        lambda t: ["--format", "int4", "--trt-calib-table", str(t / "t.cache")],
        r"--trt-calib-table: this run quantizes no activations",
    ),
    "bad-version": (
        lambda t: [
            "--activation-format",
            "int8",
            "--trt-calib-table",
            str(t / "t.cache"),
            "--trt-calib-version",
            "10.3",
        ],
        r"--trt-calib-version must be a TensorRT version as major\.minor\.patch .*not '10\.3'$",
    ),
    "bad-form": (
        lambda t: ["--trt-calib-form", "tensorrt-json"],
        r"argument --trt-calib-form: invalid choice: 'tensorrt-json'",
    ),
    "table-is-the-output": (
        lambda t: [
            "--activation-format",
            "int8",
            "-o",
            str(t / "q.onnx"),
            "--trt-calib-table",
            str(t / "q.onnx"),
        ],
        r"-o .*q\.onnx and --trt-calib-table .*q\.onnx are the same file",
    ),
    "table-in-a-missing-directory": (
        lambda t: ["--activation-format", "int8", "--trt-calib-table", str(t / "no" / "t")],
        r"calibration table .*/no/t: directory .*/no does not exist",
    ),
    "matmulnbits-with-float-weights": (
        lambda t: [
            "--format",
            "int4",
            "--int4-layout",
            "matmulnbits",
            "--weights-mode",
            "qdq",
            "-o",
            str(t / "q.onnx"),
        ],
        r"--int4-layout matmulnbits stores the weights quantized: it cannot go with "
        r"--weights-mode qdq$",
    ),
    "bad-layout": (
        lambda t: ["--int4-layout", "nbits"],
        r"argument --int4-layout: invalid choice: 'nbits'",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_and_writes_nothing(workdir, tmp_path, capsys, case):
    extra, pattern = BAD[case]
    assert main(["calibrate", *good(workdir, *extra(tmp_path))]) == 2
    assert_one_error_line(capsys.readouterr(), pattern)
    assert list(tmp_path.iterdir()) == []


def test_table_on_the_model_is_refused(workdir, capsys):
    before = (workdir / "model.onnx").read_bytes()
    model = str(Path(workdir / "model.onnx"))
    argv = good(workdir, "--activation-format", "int8", "--trt-calib-table", model)
    assert main(["calibrate", *argv]) == 2
    assert_one_error_line(capsys.readouterr(), r"--trt-calib-table .*model\.onnx is the input")
    assert (workdir / "model.onnx").read_bytes() == before

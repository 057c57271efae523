"""Weight method awq end to end (awq_models.py's block, int4 weight-only): ``calibrate_onnx`` and
``qcal calibrate`` write a model ONNX Runtime runs whose held-out output error is no worse than
round-to-nearest max's (and no worse again with the clip search); bad input is one
``qcal: error:`` line, exit 2, nothing written."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import onnxruntime as ort
import pytest
from awq_models import write_block
from error_lines import assert_one_error_line

from qcal_export.cli import main
from qcal_export.pipeline.calibrate import calibrate_onnx


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    """The block model with 10 calibration batches, and 4 other batches to validate on."""
    folder = tmp_path_factory.mktemp("awq")
    write_block(folder / "held", batches=4, seed=7)
    write_block(folder, batches=10)
    return folder


def held_out_rel_l2(block, tmp_path, name, method, **options):
    result = calibrate_onnx(
        block / "model.onnx",
        str(block / "data"),
        format="int4",
        activation_format="none",
        weight_method=method,
        block_size=32,
        validate_data=str(block / "held" / "data"),
        output=str(tmp_path / f"{name}.onnx"),
        **options,
    )
    validation = result.report["validation"]
    assert validation["runtime_issue"] is None
    return validation["default"]["y"]["rel_l2"], result


def test_awq_is_no_worse_than_rtn_on_held_out_data(block, tmp_path):
    digest = hashlib.sha256((block / "model.onnx").read_bytes()).hexdigest()
    rtn, _ = held_out_rel_l2(block, tmp_path, "rtn", "max")
    awq, result = held_out_rel_l2(block, tmp_path, "awq", "awq")
    clipped, _ = held_out_rel_l2(block, tmp_path, "clip", "awq", method_options={"clip": 1})
    assert awq <= rtn and clipped <= awq
    assert result.report["batches_per_pass"] == [10]
    assert set(result.report["awq"]["inputs"]) == {"h", "a", "t"}
    assert hashlib.sha256((block / "model.onnx").read_bytes()).hexdigest() == digest
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    feed = dict(np.load(block / "held" / "data" / "batch_000.npz"))
    assert np.isfinite(session.run(None, feed)[0]).all()


def test_cli_writes_the_awq_model(block, tmp_path, capsys):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    argv = [str(block / "model.onnx"), "--data", str(block / "data"), "--format", "int4"]
    argv += ["--activation-format", "none", "--weight-method", "awq", "--option", "clip=1"]
    argv += [
        "--validate-data",
        str(block / "held" / "data"),
        "-o",
        str(out),
        "--report",
        str(report),
    ]
    assert main(["calibrate", *argv]) == 0
    written = json.loads(report.read_text())
    assert all(e["clip"] for e in written["awq"]["inputs"].values())
    assert written["validation"]["default"]["y"]["cosine"] > 0.98
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert "qcal: error" not in capsys.readouterr().err


ERRORS = {
    "format": (["--format", "fp8", "--weight-method", "awq"], r"method 'awq' needs format int4"),
    "clip": (["--option", "clip=2"], r"option clip=2.* is out of range: it must be true or false"),
    "grid": (["--option", "grid=1"], r"option grid=1.* must be an integer in \[2, 100\]"),
    "no-data": (["--no-data"], r"awq searches its scales on data: pass --data"),
    "scales-in": (["--scales-in", "S"], r"awq .* scales_in \(--scales-in\)"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_awq_input_exits_2_with_one_error_line(block, tmp_path, capsys, case):
    extra, pattern = ERRORS[case]
    scales = tmp_path / "s.safetensors"
    if case == "scales-in":
        argv = ["calibrate", str(block / "model.onnx"), "--data", str(block / "data")]
        assert main([*argv, "--format", "int4", "--scales", str(scales)]) == 0
        capsys.readouterr()
        extra = ["--scales-in", str(scales)]
    data = [] if case == "no-data" else ["--data", str(block / "data")]
    extra = [e for e in extra if e != "--no-data"]
    argv = [str(block / "model.onnx"), *data, "--format", "int4", "--weight-method", "awq"]
    before = sorted(os.listdir(tmp_path))
    assert main(["calibrate", *argv, *extra, "-o", str(tmp_path / "q.onnx")]) == 2
    assert_one_error_line(capsys.readouterr(), pattern)
    assert sorted(os.listdir(tmp_path)) == before

"""The deployment section: the kernels ORT's profiler shows for the quantized model, and its
latency and size against the float model's (the numbers are measured, not checked)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from placement_models import cnn_batches, cnn_model

from qcal_export import calibrate_onnx
from qcal_export.cli import main
from qcal_export.validation.deployment import (
    integer_kernels,
    measure_deployment,
    no_integer_kernels,
    profile_kernels,
)

CPU = ["CPUExecutionProvider"]


def test_profile_counts_the_kernels_ort_runs_after_its_fusions(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn_model(), str(path))
    out = tmp_path / "q.onnx"
    calibrate_onnx(path, cnn_batches(), output=out, target="ort", activation_format="uint8")
    feed = cnn_batches(1)[0]
    float_kernels = profile_kernels(path, feed, CPU)
    assert integer_kernels(float_kernels) == {}
    assert float_kernels["Gemm"] == 1
    kernels = profile_kernels(out, feed, CPU)
    # the three Convs, the Add, the Concat and the pooling run as ORT's 8-bit kernels
    assert integer_kernels(kernels) == {
        "NhwcMaxPool": 1,
        "QLinearAdd": 1,
        "QLinearConcat": 1,
        "QLinearConv": 3,
        "QLinearGlobalAveragePool": 1,
    }


def test_deployment_section_measures_both_models_on_one_batch(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn_model(), str(path))
    out = tmp_path / "q.onnx"
    result = calibrate_onnx(path, cnn_batches(), output=out, target="ort")
    section = measure_deployment(path, onnx.load(str(out)), out, cnn_batches(1, 2)[0], CPU, 3)
    assert section["batch"] == {"x": [2, 3, 8, 8]} and section["runs"] == 3
    assert section["float"]["file_bytes"] == path.stat().st_size
    assert section["quantized"]["file_bytes"] == out.stat().st_size
    assert all(side["latency_ms"] > 0 for side in (section["float"], section["quantized"]))
    assert result.report["deployment"]["quantized"]["file_bytes"] == out.stat().st_size
    assert "note" not in section  # integer kernels ran: nothing to explain


def test_a_model_without_integer_kernels_says_why(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn_model(), str(path))
    out = tmp_path / "q.onnx"
    calibrate_onnx(path, cnn_batches(), output=out, format="fp8", validate_batches=0)
    section = measure_deployment(path, onnx.load(str(out)), out, cnn_batches(1, 2)[0], CPU, 1)
    assert section["integer_kernels"] == {}
    assert section["note"].startswith("ONNX Runtime fused no integer kernels")
    assert "TensorRT" in no_integer_kernels(["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_unwritten_model_is_measured_serialized(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn_model(), str(path))
    result = calibrate_onnx(path, cnn_batches(), target="tensorrt", activation_format="uint8")
    section = result.report["deployment"]
    assert section["quantized"]["file_bytes"] > 0
    assert "QLinearConv" in section["integer_kernels"]


def test_cli_target_places_and_reports(tmp_path, capsys):
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn_model(), str(path))
    np.savez(tmp_path / "data.npz", **cnn_batches(1, 8)[0])
    for target in ("ort", "tensorrt"):
        out, report = tmp_path / f"{target}.onnx", tmp_path / f"{target}.json"
        args = ["calibrate", str(path), "--data", str(tmp_path / "data.npz"), "-o", str(out)]
        code = main([*args, "--report", str(report), "--target", target])
        assert code == 0
        quantized = {
            n.input[0] for n in onnx.load(str(out)).graph.node if n.op_type == "QuantizeLinear"
        }
        assert ("t2" in quantized) == (target == "ort")  # a conv output: ORT's QLinearConv
        assert "deployment" in json.loads(report.read_text())
    capsys.readouterr()


@pytest.mark.slow
def test_ort_form_of_the_demo_transformer_runs_integer_kernels(tmp_path):
    from qcal_export import demo

    model = demo.demo_model_path(tmp_path / "cache")
    calib, _ = demo.demo_texts(num_calib=16, num_heldout=8)
    batches = demo.demo_batches(calib, batch_size=8)
    # min_cosine the placement meets on these few texts: the kernels of the ort form itself,
    # not of the compute-ops fallback (test_fallback.py), are the subject here
    result = calibrate_onnx(
        model, batches, target="ort", activation_format="uint8", validate_batches=1, min_cosine=0.9
    )
    kernels = result.report["deployment"]["integer_kernels"]
    # every MatMul runs in 8 bits (the two whose float output joins the residual stream as
    # MatMulIntegerToFloat), and so do the bias Adds off that stream, the GELU and scale Muls
    assert kernels["QLinearMatMul"] + kernels["MatMulIntegerToFloat"] == 48
    assert kernels["MatMulIntegerToFloat"] == 12
    assert kernels["QLinearAdd"] == 30 and kernels["QLinearMul"] >= 18
    sizes = result.report["deployment"]
    assert sizes["quantized"]["file_bytes"] < sizes["float"]["file_bytes"] / 3

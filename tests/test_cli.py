"""The ``qcal`` command end to end on the small Conv + Gemm model of convgemm.py.

The oracles are ONNX Runtime on the float model and the scales file and report the run wrote;
bad input is test_cli_errors.py's. ``calibrate_onnx`` itself is tested in
pipeline/test_pipeline.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from convgemm import ACTIVATIONS, BATCH, BATCHES, CPU, WEIGHTS, data_batches, op_counts, run_model
from onnx import TensorProto

from qcal_export.artifacts.scales import load_scales
from qcal_export.calibrators import EntropyCalibrator, PercentileCalibrator, ShrinkMseCalibrator
from qcal_export.cli import main
from qcal_export.spec.formats import get_format
from qcal_export.spec.granularity import PerTensor
from qcal_export.spec.methods import METHOD_OPTIONS


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def calibrated(workdir) -> dict[str, Path]:
    """One int8 max ``qcal calibrate`` run writing the model, scales and report (target
    tensorrt: the tensors of convgemm.ACTIVATIONS; test_cli_default_target.py runs the default)."""
    out = workdir / "int8"
    out.mkdir()
    paths = {
        "model": out / "model.qdq.onnx",
        "scales": out / "scales.safetensors",
        "report": out / "report.json",
    }
    model = workdir / "model.onnx"
    data = workdir / "data"
    argv = ["calibrate", str(model), "--data", str(data), "-o", str(paths["model"])]
    argv += ["--scales", str(paths["scales"]), "--report", str(paths["report"])]
    argv += ["--target", "tensorrt"]
    paths["sha256_before"] = sha256(model)
    assert main(argv) == 0
    return paths


# ---- qcal calibrate -------------------------------------------------------------------------


def test_calibrate_writes_model_scales_and_report(workdir, calibrated):
    report = json.loads(calibrated["report"].read_text())
    assert report["model_sha256"] == calibrated["sha256_before"]
    assert report["output_model"] == str(calibrated["model"])
    assert report["scales_file"] == str(calibrated["scales"])
    assert report["batches_per_pass"] == [BATCHES]
    assert report["opset"] == {"from": 17, "to": 17}
    assert report["quantized_nodes"] == ["/conv/Conv", "/fc/Gemm"]
    assert report["excluded_nodes"] == []
    assert report["providers"] == CPU
    rows = {r["tensor"]: r for r in report["tensors"]}
    assert set(rows) == ACTIVATIONS | WEIGHTS
    assert {r["granularity"] for n, r in rows.items() if n in WEIGHTS} == {"per-axis(0)"}
    assert {r["granularity"] for n, r in rows.items() if n in ACTIVATIONS} == {"per-tensor"}
    # activation amax is the abs-max over all the data
    xs = data_batches(workdir)
    assert rows["x"]["amax"] == pytest.approx(float(max(np.abs(x).max() for x in xs)), rel=1e-7)
    # one error entry per graph output, int8 max is close to the float model
    assert set(report["output_error"]) == {"y"}
    error = report["output_error"]["y"]
    assert error["cosine"] > 0.99
    assert 0 < error["rel_l2"] < 0.05
    assert error["max_abs"] > 0


def test_report_error_is_what_ort_computes(workdir, calibrated):
    """Recompute max abs, rel L2 and cosine over the validated batches with two sessions."""
    report = json.loads(calibrated["report"].read_text())
    ref, cand = [], []
    for x in data_batches(workdir):
        ref.append(run_model(workdir / "model.onnx", x).astype(np.float64).ravel())
        cand.append(run_model(calibrated["model"], x).astype(np.float64).ravel())
    ref, cand = np.concatenate(ref), np.concatenate(cand)
    error = report["output_error"]["y"]
    assert error["max_abs"] == pytest.approx(np.abs(cand - ref).max(), rel=1e-12)
    rel_l2 = np.linalg.norm(cand - ref) / np.linalg.norm(ref)
    assert error["rel_l2"] == pytest.approx(rel_l2, rel=1e-9)
    cosine = ref @ cand / (np.linalg.norm(ref) * np.linalg.norm(cand))
    assert error["cosine"] == pytest.approx(cosine, rel=1e-9)


def test_written_qdq_model_runs_and_holds_qdq_nodes(workdir, calibrated):
    model = onnx.load(str(calibrated["model"]))
    onnx.checker.check_model(model, full_check=True)
    counts = op_counts(model)
    assert counts["QuantizeLinear"] == 2  # the two activations
    assert counts["DequantizeLinear"] == 4  # the two activations and the two weights
    stored = {t.name: t for t in model.graph.initializer}
    assert not WEIGHTS & set(stored)  # float weights replaced by their int8 form
    assert stored["conv.weight_quantized"].data_type == TensorProto.INT8
    assert stored["fc.weight_quantized"].data_type == TensorProto.INT8
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    producers = {o: n for n in model.graph.node for o in n.output}
    assert producers[conv.input[0]].op_type == "DequantizeLinear"
    assert producers[conv.input[1]].op_type == "DequantizeLinear"
    x = data_batches(workdir)[0]
    y = run_model(calibrated["model"], x)
    reference = run_model(workdir / "model.onnx", x)
    assert y.shape == (BATCH, 5) and y.dtype == np.float32
    assert not np.array_equal(y, reference)  # it really is quantized
    assert np.abs(y - reference).max() < 0.05 * np.abs(reference).max()


def test_scales_file_matches_the_report(calibrated):
    scales, header = load_scales(calibrated["scales"])
    assert set(scales) == ACTIVATIONS | WEIGHTS
    assert header["model_sha256"] == calibrated["sha256_before"]
    report = json.loads(calibrated["report"].read_text())
    for row in report["tensors"]:
        s = scales[row["tensor"]]
        assert row["amax"] == pytest.approx(float(s.amax.max()), rel=1e-7)
        assert torch.allclose(s.scale, s.amax / 127, rtol=1e-6, atol=0)
        assert torch.equal(s.zero_point, torch.zeros_like(s.scale))
    assert scales["conv.weight"].amax.shape == (4,)
    assert scales["fc.weight"].amax.shape == (5,)


def test_input_model_file_is_unchanged(workdir, calibrated):
    assert sha256(workdir / "model.onnx") == calibrated["sha256_before"]
    assert sorted(p.name for p in calibrated["model"].parent.iterdir()) == [
        "model.qdq.onnx",
        "report.json",
        "scales.safetensors",
    ]


def test_calibrate_prints_tables_and_what_it_wrote(workdir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # no folding of long temporary paths
    out = tmp_path / "q.onnx"
    argv = ["calibrate", str(workdir / "model.onnx"), "--data", str(workdir / "data")]
    assert main([*argv, "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.out
    assert "output error vs the float model" in captured.out
    assert "conv.weight" in captured.out
    assert "Traceback" not in captured.err
    assert out.is_file()


def test_layer_view_and_target_from_the_command_line(workdir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    report = tmp_path / "r.json"
    argv = ["calibrate", str(workdir / "model.onnx"), "--data", str(workdir / "data")]
    argv += ["--target-cosine", "0.99999999", "--holdout-every", "2", "--report", str(report)]
    assert main([*argv, "-o", str(tmp_path / "q.onnx")]) == 0
    printed = capsys.readouterr().out
    written = json.loads(report.read_text())
    precision = written["precision"]
    assert "per-layer view: output error with only that node quantized" in printed
    assert f"{len(precision['float_nodes'])} nodes left in float" in printed
    assert {row["node"] for row in written["layers"]} == {"/conv/Conv", "/fc/Gemm"}
    assert precision["heldout_switchable"]["cosine"] >= 0.99999999
    assert precision["target"] == {"metric": "cosine", "value": 0.99999999}


def test_method_auto_and_smoothing_from_the_command_line(workdir, tmp_path, capsys):
    report = tmp_path / "r.json"
    argv = ["calibrate", str(workdir / "model.onnx"), "--data", str(workdir / "data")]
    argv += ["--method", "auto", "--smooth", "0.5", "--report", str(report)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    written = json.loads(report.read_text())
    picked = [c["picked"] for c in written["method_choice"].values()]
    assert "method auto picked" in printed and len(picked) == len(written["method_choice"])
    assert f"smoothed {len(written['smoothing']['notes'])} activations (alpha 0.5)" in printed
    activation_methods = {r["method"] for r in written["tensors"] if r["kind"] == "activation"}
    assert activation_methods == set(picked)


@pytest.mark.parametrize(
    ("method", "weight_method", "options", "calibrator"),
    [
        ("percentile", "shrink-mse", {"percentile": 99.9, "grid": 50}, PercentileCalibrator),
        ("entropy", "max", {"bins": 512, "quantized_bins": 64}, EntropyCalibrator),
        ("shrink-mse", "shrink-mse", {"norm": 2.0, "patience": 3}, ShrinkMseCalibrator),
    ],
)
def test_histogram_and_shrink_methods_from_the_command_line(
    workdir, tmp_path, method, weight_method, options, calibrator
):
    scales = tmp_path / "s.safetensors"
    argv = ["calibrate", str(workdir / "model.onnx"), "--data", str(workdir / "data")]
    argv += ["--method", method, "--weight-method", weight_method, "--scales", str(scales)]
    argv += [f"--option={k}={v}" for k, v in options.items()]
    assert main([*argv, "--activation-format", "int8"]) == 0
    found, _ = load_scales(scales)
    taken = {k: v for k, v in options.items() if k in METHOD_OPTIONS[method]}
    assert (found["x"].method, found["x"].options) == (method, taken)
    assert found["conv.weight"].method == weight_method
    cal = calibrator(get_format("int8"), PerTensor(), **taken)
    for x in data_batches(workdir):
        cal.collect(torch.from_numpy(x))
    assert torch.equal(found["x"].amax, cal.compute_amax())


def test_scales_in_reexport_gives_the_same_model_outputs(workdir, calibrated, tmp_path):
    again = tmp_path / "again.onnx"
    report_path = tmp_path / "report.json"
    argv = ["calibrate", str(workdir / "model.onnx"), "--scales-in", str(calibrated["scales"])]
    argv += ["--target", "tensorrt"]
    assert main([*argv, "-o", str(again), "--report", str(report_path)]) == 0
    for x in data_batches(workdir)[:2]:
        assert np.array_equal(run_model(again, x), run_model(calibrated["model"], x))
    report = json.loads(report_path.read_text())
    assert report["batches_per_pass"] == []  # nothing calibrated
    assert report["output_error"] == {}  # and no data to validate with


def test_inspect_prints_nodes_and_opset(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["inspect", "model.onnx"]) == 0
    out = capsys.readouterr().out
    assert "model.onnx: opset 17, 2 quantizable nodes" in out
    conv = next(line for line in out.splitlines() if "/conv/Conv" in line)
    gemm = next(line for line in out.splitlines() if "/fc/Gemm" in line)
    assert "Conv" in conv and "x [batchx3x8x8]" in conv and "conv.weight [4x3x3x3]" in conv
    assert "/Flatten_output_0 [batchx144]" in gemm and "fc.weight [5x144]" in gemm
    assert main(["inspect", "model.onnx", "--op-types", "Gemm"]) == 0
    out = capsys.readouterr().out
    assert "1 quantizable nodes" in out and "/fc/Gemm" in out and "/conv/Conv" not in out


def test_console_script(workdir, tmp_path):
    qcal = shutil.which("qcal")
    assert qcal is not None, "the qcal console script is not installed"
    ok = subprocess.run(
        [qcal, "calibrate", "model.onnx", "--data", "data", "-o", str(tmp_path / "q.onnx")],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert ok.returncode == 0, ok.stderr
    assert f"wrote {tmp_path / 'q.onnx'}" in ok.stdout
    x = data_batches(workdir)[0]
    reference = run_model(workdir / "model.onnx", x)
    assert np.abs(run_model(tmp_path / "q.onnx", x) - reference).max() < 0.05
    bad = subprocess.run(
        [qcal, "calibrate", "missing.onnx", "--data", "data"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "qcal: error: model file missing.onnx does not exist"
    ]
    assert bad.stdout == ""

"""``qcal calibrate --activation-format int16`` (A16W8) on the small Conv + Gemm model of
convgemm.py: the model, scales file and report it writes, against ONNX Runtime on the float
model and an A8W8 run of the same command; a 16-bit scales file read back with --scales-in; the
refusals one error line each."""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch
from convgemm import data_batches, run_model
from error_lines import assert_one_error_line, good
from onnx import TensorProto, numpy_helper
from safetensors import safe_open

from qcal_export.artifacts.scales import load_scales
from qcal_export.cli import main


def calibrate(workdir, out, *options: str) -> int:
    argv = ["calibrate", *good(workdir, "-o", str(out / "q.onnx"), *options)]
    argv += ["--scales", str(out / "scales.safetensors"), "--report", str(out / "report.json")]
    return main(argv)


def stored_dtype(path, key: str) -> torch.dtype:
    """The dtype of ``key`` as the safetensors file holds it."""
    with safe_open(str(path), "pt") as f:
        return f.get_tensor(key).dtype


def rel_l2(workdir, path) -> float:
    got, want = [], []
    for x in data_batches(workdir):
        got.append(run_model(path, x).ravel())
        want.append(run_model(workdir / "model.onnx", x).ravel())
    got, want = np.concatenate(got).astype(np.float64), np.concatenate(want).astype(np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_activation_format_int16_writes_an_a16w8_model(workdir, tmp_path, capsys):
    a16, a8 = tmp_path / "a16", tmp_path / "a8"
    a16.mkdir(), a8.mkdir()
    assert calibrate(workdir, a16, "--activation-format", "int16") == 0
    assert "verdict: PASS" in capsys.readouterr().out
    model = onnx.load(str(a16 / "q.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 21
    initializers = {t.name: t for t in model.graph.initializer}
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantizers
    assert {initializers[n.input[2]].data_type for n in quantizers} == {TensorProto.INT16}
    weights = {"conv.weight_quantized", "fc.weight_quantized"}
    assert {initializers[w].data_type for w in weights} == {TensorProto.INT8}

    scales, _ = load_scales(a16 / "scales.safetensors")
    for node in quantizers:
        entry = scales[node.input[0]]
        assert entry.format == "int16"
        assert (
            stored_dtype(a16 / "scales.safetensors", f"{node.input[0]}.zero_point") == torch.int16
        )
        stored = numpy_helper.to_array(initializers[node.input[1]])
        assert stored == np.float32(entry.amax.item() / np.float32(32767))
    assert scales["conv.weight"].format == "int8"
    report = json.loads((a16 / "report.json").read_text())
    assert report["validation"]["runtime_issue"] is None

    assert calibrate(workdir, a8, "--activation-format", "int8") == 0
    assert rel_l2(workdir, a16 / "q.onnx") < 0.5 * rel_l2(workdir, a8 / "q.onnx")


def test_uint16_scales_file_is_read_back_and_refused_for_int16(workdir, tmp_path, capsys):
    """--activation-format uint16 writes uint16 zero points; --scales-in exports the same model
    from them, and refuses them for int16 activations in one error line, writing nothing."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    assert calibrate(workdir, first, "--activation-format", "uint16") == 0
    path = first / "scales.safetensors"
    assert stored_dtype(path, "x.zero_point") == torch.uint16
    assert (
        calibrate(workdir, second, "--activation-format", "uint16", "--scales-in", str(path)) == 0
    )
    for x in data_batches(workdir)[:2]:
        np.testing.assert_array_equal(
            run_model(first / "q.onnx", x), run_model(second / "q.onnx", x)
        )
    capsys.readouterr()
    out = tmp_path / "int16.onnx"
    argv = good(workdir, "-o", str(out), "--activation-format", "int16", "--scales-in", str(path))
    assert main(["calibrate", *argv]) == 2
    pattern = r"activation 'x' was calibrated as uint16 per-tensor, the recipe asks for int16"
    assert_one_error_line(capsys.readouterr(), pattern)
    assert not out.exists()


def test_unknown_activation_format_is_one_error_line(workdir, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert main(["calibrate", *good(workdir, "-o", str(out), "--activation-format", "int32")]) == 2
    pattern = r"argument --activation-format: invalid choice: 'int32' \(choose from .*int16"
    assert_one_error_line(capsys.readouterr(), pattern)
    assert not out.exists()

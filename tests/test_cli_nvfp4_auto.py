"""``qcal calibrate --format nvfp4 --method auto``: each NVFP4 activation's global amax chosen
among max, percentile and entropy by the emulated model's outputs; the NVFP4 model is written
and validated through the exact FP4 emulation."""

from __future__ import annotations

import json

import onnx
from mlp import make_mlp
from onnx import TensorProto

from qcal_export.cli import main


def test_nvfp4_method_auto_from_the_command_line(tmp_path, capsys):
    root = make_mlp(tmp_path, seq=True)
    report, output = tmp_path / "r.json", tmp_path / "q.onnx"
    argv = ["calibrate", str(root / "mlp.onnx"), "--data", str(root / "data"), "-o", str(output)]
    argv += ["--format", "nvfp4", "--method", "auto", "--report", str(report)]
    assert main(argv) == 0
    assert "method auto picked" in capsys.readouterr().out
    written = json.loads(report.read_text())
    activations = {r["tensor"]: r for r in written["tensors"] if r["kind"] == "activation"}
    choice = written["method_choice"]
    assert set(choice) == set(activations) and len(choice) == 3
    for tensor, entry in choice.items():
        assert list(entry["output_rel_l2"]) == ["max", "percentile", "entropy"]
        assert entry["picked"] == min(entry["output_rel_l2"], key=entry["output_rel_l2"].get)
        assert activations[tensor]["method"] == entry["picked"]
    assert "fp4 emulation" in written["validation"]["validator"]
    model = onnx.load(str(output))
    onnx.checker.check_model(model, full_check=True)
    fp4 = [
        n
        for n in model.graph.node
        if n.op_type == "QuantizeLinear"
        and any(a.name == "output_dtype" and a.i == TensorProto.FLOAT4E2M1 for a in n.attribute)
    ]
    assert len(fp4) == 3  # the NVFP4 model itself, not its emulation

"""The demo end to end: real MiniLM, real text, held-out cosine of max vs mse."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from qcal_export.cli import main
from qcal_export.demo import demo_batches, demo_texts, embedding_cosine

FP8 = TensorProto.FLOAT8E4M3FN


@pytest.mark.slow
def test_qcal_demo_writes_models_whose_embeddings_track_the_float_model(tmp_path, capsys):
    code = main(
        [
            "demo",
            "--out-dir",
            str(tmp_path / "out"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--formats",
            "int8",
            "fp8",
            "--methods",
            "max",
            "--weight-methods",
            "max",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "uint8" in printed and "fp8" in printed  # int8 (uint8 activations), wrapped
    float_model = next((tmp_path / "cache").glob("*.onnx"))
    _, heldout = demo_texts()
    batches = demo_batches(heldout[:32], batch_size=16)
    scores = {}
    for fmt in ("int8", "fp8"):
        path = tmp_path / "out" / f"minilm_{fmt}_a-max_w-max.onnx"
        model = onnx.load(str(path))
        ops = [n.op_type for n in model.graph.node]
        if fmt == "int8":
            # the default target for int8, ort: the 48 MatMuls' inputs and, off the residual
            # stream, the element-wise ops' (one Q per distinct activation tensor, 177 in all);
            # DQ also on the 36 MatMul weights, the 24 bias Adds' constants and the 3 embedding
            # tables (Gather)
            assert ops.count("QuantizeLinear") == 177
            assert ops.count("DequantizeLinear") == 177 + 36 + 24 + 3
        else:
            # fp8's default target, tensorrt: the MatMuls' inputs only
            assert ops.count("QuantizeLinear") == 48  # one per distinct activation tensor
            assert ops.count("DequantizeLinear") == 48 + 36  # activations + weights
        producers = {o: n.op_type for n in model.graph.node for o in n.output}
        matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
        assert len(matmuls) == 48
        assert all(producers.get(i) == "DequantizeLinear" for n in matmuls for i in n.input)
        read = {i for n in matmuls for i in n.input}
        dqs = [
            n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in read
        ]
        inits = {t.name: t.data_type for t in model.graph.initializer}
        weights = {inits[n.input[2]] for n in dqs if n.input[0] in inits}
        activations = {inits[n.input[2]] for n in dqs if n.input[0] not in inits}
        want = (TensorProto.INT8, TensorProto.UINT8) if fmt == "int8" else (FP8, FP8)
        assert (weights, activations) == ({want[0]}, {want[1]})
        scores[fmt] = embedding_cosine(float_model, path, batches)
        report = json.loads(path.with_suffix(".json").read_text())
        assert report["batches_per_pass"] == [16]
        assert report["opset"] == {"from": 17, "to": 17 if fmt == "int8" else 19}
    # fp8 keeps far more of the embedding than int8 on this model; both stay close to float.
    assert 0.95 < scores["int8"]["mean"] < scores["fp8"]["mean"] <= 1.0
    assert scores["fp8"]["min"] > 0.99
    assert np.isfinite(scores["int8"]["min"])


@pytest.mark.slow
def test_qcal_demo_nvfp4_runs_in_its_fp4_emulation(tmp_path, capsys):
    """W4A4 NVFP4 with the per-block FP8-scale sweep: validated and scored in ORT over the
    model's FP4 emulation (ORT has no FP4 kernels)."""
    code = main(
        [
            "demo",
            "--out-dir", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"),
            "--formats", "nvfp4",
            "--weight-methods", "nvfp4-mse",
        ]
    )  # fmt: skip
    assert code == 0
    path = tmp_path / "out" / "minilm_nvfp4_a-max_w-nvfp4-mse.onnx"
    report = json.loads(path.with_suffix(".json").read_text())
    assert report["validator"] == "onnxruntime (CPUExecutionProvider, fp4 emulation)"
    assert report["opset"] == {"from": 17, "to": 23}
    errors = [r["weight_rel_error"] for r in report["tensors"] if r["kind"] == "weight"]
    assert len(errors) == 36 and all(0.0 < e < 0.2 for e in errors)
    model = onnx.load(str(path))
    fp4 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT4E2M1]
    assert len(fp4) == 36
    float_model = next((tmp_path / "cache").glob("*.onnx"))
    _, heldout = demo_texts()
    score = embedding_cosine(float_model, path, demo_batches(heldout[:16], batch_size=16))
    assert 0.9 < score["mean"] < 0.999


@pytest.mark.slow
def test_qcal_demo_a16w8_keeps_the_embedding(tmp_path, capsys):
    """int16 activations with int8 weights (A16W8): opset 21, 16-bit activation Q/DQ, and the
    held-out embedding far closer to float than A8W8's (about 0.99 on this model)."""
    code = main(
        [
            "demo",
            "--out-dir", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"),
            "--formats", "int8",
            "--activation-format", "int16",
            "--weight-methods", "max",
        ]
    )  # fmt: skip
    assert code == 0
    assert "int16" in capsys.readouterr().out
    path = tmp_path / "out" / "minilm_int8_a-int16-max_w-max.onnx"
    report = json.loads(path.with_suffix(".json").read_text())
    assert report["opset"] == {"from": 17, "to": 21}
    model = onnx.load(str(path))
    inits = {t.name: t.data_type for t in model.graph.initializer}
    quantized = {inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert quantized == {TensorProto.INT16}
    float_model = next((tmp_path / "cache").glob("*.onnx"))
    _, heldout = demo_texts()
    score = embedding_cosine(float_model, path, demo_batches(heldout[:32], batch_size=16))
    assert score["min"] > 0.999


@pytest.mark.slow
def test_qcal_demo_weight_only_mx_rows(tmp_path, capsys):
    """Weight-only rows (``--activation-format none``): MXFP4 weights with the mx-mse exponent
    search, E8M0 block scales of 32 at opset 24, scored over the emulation."""
    code = main(
        [
            "demo",
            "--out-dir", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"),
            "--formats", "mxfp4",
            "--activation-format", "none",
            "--weight-methods", "mx-mse",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "mxfp4" in printed and "(weigh" in printed  # the label, wrapped in its column
    path = tmp_path / "out" / "minilm_mxfp4_a-none-max_w-mx-mse.onnx"
    report = json.loads(path.with_suffix(".json").read_text())
    assert report["opset"] == {"from": 17, "to": 24}
    model = onnx.load(str(path))
    scales = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT8E8M0]
    assert len(scales) == 36
    assert not any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    float_model = next((tmp_path / "cache").glob("*.onnx"))
    _, heldout = demo_texts()
    score = embedding_cosine(float_model, path, demo_batches(heldout[:16], batch_size=16))
    assert 0.9 < score["mean"] < 0.9999


@pytest.mark.slow
def test_qcal_demo_mixed_format_row(tmp_path, capsys):
    """``--mixed-formats``: one more row, the mixed-format search for ``--target-cosine``,
    labelled with its bits per weight; every unit of the report took int8 or float, the
    exported model matches the report, and its held-out embedding keeps the target."""
    code = main(
        [
            "demo",
            "--out-dir", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"),
            "--formats",
            "--mixed-formats", "int8",
            "--target-cosine", "0.9",
        ]
    )  # fmt: skip
    assert code == 0
    assert "bits/w" in capsys.readouterr().out
    path = tmp_path / "out" / "minilm_mixed-int8_a-max_w-max.onnx"
    report = json.loads(path.with_suffix(".json").read_text())
    mixed = report["mixed_formats"]
    assert {unit["format"] for unit in mixed["units"]} <= {"int8", "float"}
    assert mixed["heldout_exported"]["cosine"] >= 0.9
    int8_units = sum(unit["format"] == "int8" for unit in mixed["units"])
    model = onnx.load(str(path))
    quantized = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert (int8_units > 0) == (len(quantized) > 0)
    float_model = next((tmp_path / "cache").glob("*.onnx"))
    _, heldout = demo_texts()
    score = embedding_cosine(float_model, path, demo_batches(heldout[:32], batch_size=16))
    assert score["mean"] > 0.9

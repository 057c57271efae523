"""calibrate_onnx on models with nothing quantizable, or that ONNX Runtime's CPU provider cannot
run: each is one error naming why, or (weight-only) an export that runs elsewhere."""

from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from exported_graphs import calibrate_onnx, matmul_graph, qdq64, save, scale_of
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from qcal_export.errors import ModelError, RecipeError

CPU = ["CPUExecutionProvider"]


# ---- nothing to quantize, and models ORT's CPU provider cannot run ------------------------------


def test_a_double_model_says_why_nothing_is_quantized(tmp_path):
    w = np.ones((8, 4))
    path = save(matmul_graph(w, ["b", 8], TensorProto.DOUBLE), tmp_path / "m.onnx")
    data = [{"x": np.ones((2, 8))}]
    message = (
        "no node of types ['MatMul'] left to quantize "
        "(excluded: []): MatMul 'mm': it computes in double: ONNX QuantizeLinear takes float, "
        "float16 or bfloat16, not double: cast the model to float32 to quantize it"
    )
    with pytest.raises(RecipeError, match=re.escape(message) + "$"):
        calibrate_onnx(path, data, output=tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_a_weight_on_input_0_is_named_as_the_reason(tmp_path):
    """W @ x: int4 (weight-only) has nothing to quantize and says why; int8 quantizes x and
    notes that W stays float."""
    w = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
    path = save(matmul_graph(w, [8, "n"], weight_first=True), tmp_path / "m.onnx")
    data = [{"x": np.random.default_rng(4).standard_normal((8, 3)).astype(np.float32)}]
    why = "initializer 'W' is input 0, but MatMul weights are quantized on input 1 only"
    with pytest.raises(
        RecipeError,
        match=re.escape(f"MatMul 'mm': {why}; the recipe leaves activations in float (input 1 'x')")
        + "$",
    ):
        calibrate_onnx(path, data, format="int4")
    result = calibrate_onnx(path, data, output=tmp_path / "q.onnx")
    assert list(result.scales) == ["x"]
    assert f"MatMul 'mm': {why}: that input stays float" in result.report["plan_notes"]
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert "W" in {t.name for t in model.graph.initializer}
    (y,) = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=CPU).run(None, data[0])
    x_scale = scale_of(model, "x")
    np.testing.assert_allclose(
        y, w.astype(np.float64) @ qdq64(data[0]["x"], x_scale, 127), rtol=1e-5
    )


def bf16_model(tmp_path: Path) -> tuple[Path, np.ndarray]:
    w = np.random.default_rng(5).standard_normal((32, 4)).astype(ml_dtypes.bfloat16)
    graph = matmul_graph(np.zeros((32, 4), np.float32), ["b", 32], TensorProto.BFLOAT16)
    graph.initializer[0].CopyFrom(
        helper.make_tensor(
            "W", TensorProto.BFLOAT16, [32, 4], w.view(np.uint16).tobytes(), raw=True
        )
    )
    return save(graph, tmp_path / "bf16.onnx"), w


def test_a_bfloat16_model_is_a_model_error_on_the_cpu_and_weight_only_exports(tmp_path):
    """ORT's CPU provider has no bfloat16 MatMul: capture is one ModelError saying what to do.
    Weight-only int4 needs no capture: with validation off the model is written, and the
    reference evaluator's output equals x @ the dequantized weight."""
    path, w = bf16_model(tmp_path)
    rng = np.random.default_rng(6)
    data = [{"x": rng.standard_normal((2, 32)).astype(ml_dtypes.bfloat16)}]
    with pytest.raises(ModelError) as e:
        calibrate_onnx(path, data, output=tmp_path / "q.onnx")
    message = str(e.value)
    assert message.startswith(f"ONNX Runtime cannot load {path}: ")
    assert "Could not find an implementation for MatMul(13) node with name 'mm'" in message
    assert message.endswith("or capture on CUDA (--provider cuda)") and "\n" not in message
    assert not (tmp_path / "q.onnx").exists()
    result = calibrate_onnx(
        path, None, output=tmp_path / "q.onnx", format="int4", block_size=16, validate_batches=0
    )
    dequantized = result.scales["W"].fake_quant_weight(torch.from_numpy(w.astype(np.float32)))
    (y,) = ReferenceEvaluator(str(tmp_path / "q.onnx")).run(None, data[0])
    want = data[0]["x"].astype(np.float32) @ dequantized.numpy()
    np.testing.assert_allclose(y.astype(np.float32), want, rtol=1e-2, atol=1e-2)


def optional_input_model(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """MatMul on x, and whether the optional input 'o' was given (a bool output)."""
    w = np.random.default_rng(7).standard_normal((8, 4)).astype(np.float32)
    graph = matmul_graph(w, ["b", 8])
    optional = helper.make_optional_type_proto(
        helper.make_tensor_type_proto(TensorProto.FLOAT, ["b", 8])
    )
    graph.input.append(helper.make_value_info("o", optional))
    graph.node.append(helper.make_node("OptionalHasElement", ["o"], ["given"]))
    graph.output.append(helper.make_tensor_value_info("given", TensorProto.BOOL, []))
    return save(graph, tmp_path / "opt.onnx", opset=18), w


def test_an_optional_input_is_fed_when_given_and_left_out_otherwise(tmp_path):
    path, w = optional_input_model(tmp_path)
    rng = np.random.default_rng(8)
    x = [rng.standard_normal((3, 8)).astype(np.float32) for _ in range(2)]
    data = [{"x": x[0], "o": x[0]}, {"x": x[1]}]
    result = calibrate_onnx(path, data, output=tmp_path / "q.onnx", per_channel_weights=False)
    assert result.scales["x"].amax.item() == np.float32(max(np.abs(v).max() for v in x))
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=CPU)
    model = onnx.load(str(tmp_path / "q.onnx"))
    x_scale, w_scale = scale_of(model, "x"), scale_of(model, "W")
    for batch in data:
        y, given = session.run(None, batch)
        assert bool(given) == ("o" in batch)
        np.testing.assert_allclose(
            y, qdq64(batch["x"], x_scale, 127) @ qdq64(w, w_scale, 127), rtol=1e-5
        )


def test_a_sequence_input_is_a_model_error_naming_it(tmp_path):
    w = np.ones((8, 4), np.float32)
    graph = matmul_graph(w, ["b", 8])
    sequence = helper.make_sequence_type_proto(
        helper.make_tensor_type_proto(TensorProto.FLOAT, None)
    )
    graph.input.append(helper.make_value_info("s", sequence))
    graph.node.append(helper.make_node("SequenceLength", ["s"], ["n"]))
    graph.output.append(helper.make_tensor_value_info("n", TensorProto.INT64, []))
    path = save(graph, tmp_path / "seq.onnx")
    message = (
        f"{path}: input 's' is a sequence(tensor(float)); calibration feeds tensors (or optional "
        "tensors) only: export the model with tensor inputs"
    )
    with pytest.raises(ModelError, match=re.escape(message)):
        calibrate_onnx(path, [{"x": np.ones((2, 8), np.float32)}], output=tmp_path / "q.onnx")

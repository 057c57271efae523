"""SmoothQuant-style smoothing on the ONNX graph: the float model's outputs are unchanged (ONNX
Runtime, within float rounding), the factors are the formula's, ``1 / s`` is folded into a
LayerNormalization when every consumer takes the factors and is a Mul otherwise."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mlp import batches, make_mlp
from onnx import TensorProto, helper, numpy_helper

from qcal_export.errors import RecipeError
from qcal_export.graphs.smooth import smooth_model, smoothing_groups
from qcal_export.pipeline.calibrate import calibrate_onnx


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def layernorm_model(residual: bool) -> onnx.ModelProto:
    """x -> LayerNormalization -> two MatMuls (added); with ``residual`` the LN output is also
    added to the result."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 2, 8).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.normal(0, 1, 8).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.normal(0, 1, (8, 8)).astype(np.float32), "wq"),
        numpy_helper.from_array(rng.normal(0, 1, (8, 8)).astype(np.float32), "wk"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1),
        helper.make_node("MatMul", ["h", "wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["h", "wk"], ["k"], name="k"),
        helper.make_node("Add", ["q", "k"], ["qk"], name="add"),
    ]
    last = "qk"
    if residual:
        nodes.append(helper.make_node("Add", ["qk", "h"], ["y"], name="residual"))
        last = "y"
    graph = helper.make_graph(
        nodes,
        "ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8])],
        [helper.make_tensor_value_info(last, TensorProto.FLOAT, [None, 3, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("residual", [False, True], ids=["fold", "mul"])
def test_layernorm_fold_or_mul_keeps_the_outputs(residual):
    model = layernorm_model(residual)
    amax = np.array([0.1, 5.0, 1.0, 30.0, 0.5, 2.0, 8.0, 1e-9], dtype=np.float32)
    smoothed, notes = smooth_model(model, {"h": amax}, 0.5)
    ops = [n.op_type for n in smoothed.graph.node]
    assert ops.count("Mul") == (1 if residual else 0)
    assert ("folded into LayerNormalization ln" in notes[0]) != residual
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w_max = np.maximum(np.abs(weights["wq"]).max(1), np.abs(weights["wk"]).max(1)).astype(
        np.float64
    )
    s = np.clip(np.maximum(amax, 1e-5) ** 0.5 / w_max**0.5, 1e-5, 1e5)
    new = {t.name: numpy_helper.to_array(t) for t in smoothed.graph.initializer}
    q = next(n for n in smoothed.graph.node if n.name == "q")
    np.testing.assert_allclose(new[q.input[1]], weights["wq"] * s[:, None], rtol=1e-6)
    assert "wq" not in new and ("gamma" in new) == residual
    x = np.random.default_rng(1).normal(0, 3, (4, 3, 8)).astype(np.float32)
    np.testing.assert_allclose(
        run(smoothed, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5
    )
    onnx.checker.check_model(smoothed, full_check=True)


def producer_model(kind: str) -> onnx.ModelProto:
    """a -> MatMul (+ bias Add) or Gemm(transB=1, with bias) -> h -> MatMul -> y."""
    rng = np.random.default_rng(3)
    w0 = rng.normal(0, 1, (6, 8)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w0.T.copy() if kind == "gemm" else w0, "w0"),
        numpy_helper.from_array(rng.normal(0, 1, 8).astype(np.float32), "b0"),
        numpy_helper.from_array(rng.normal(0, 1, (8, 4)).astype(np.float32), "w1"),
    ]
    if kind == "gemm":
        nodes = [helper.make_node("Gemm", ["a", "w0", "b0"], ["h"], name="p", transB=1)]
    elif kind == "matmul+bias":
        nodes = [
            helper.make_node("MatMul", ["a", "w0"], ["u"], name="p"),
            helper.make_node("Add", ["u", "b0"], ["h"], name="bias"),
        ]
    else:
        nodes = [helper.make_node("MatMul", ["a", "w0"], ["h"], name="p")]
    nodes.append(helper.make_node("MatMul", ["h", "w1"], ["y"], name="c"))
    graph = helper.make_graph(
        nodes,
        kind,
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [i for i in inits if kind != "matmul" or i.name != "b0"],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kind", ["matmul", "matmul+bias", "gemm"])
def test_factors_fold_into_the_producing_matmul(kind):
    model = producer_model(kind)
    amax = np.array([0.1, 5.0, 1.0, 30.0, 0.5, 2.0, 8.0, 3.0])
    smoothed, notes = smooth_model(model, {"h": amax}, 0.7)
    assert [n.op_type for n in smoothed.graph.node] == [n.op_type for n in model.graph.node]
    assert "folded into" in notes[0] and "p" in notes[0]
    a = np.random.default_rng(4).normal(0, 2, (5, 6)).astype(np.float32)
    np.testing.assert_allclose(run(smoothed, {"a": a})[0], run(model, {"a": a})[0], rtol=1e-5)
    onnx.checker.check_model(smoothed, full_check=True)


@pytest.mark.parametrize("seq", [True, False], ids=["matmul", "gemm-transB"])
def test_mlp_smoothing_keeps_the_outputs_and_calibrates(tmp_path, seq):
    root = make_mlp(tmp_path, seq=seq)
    model = onnx.load(str(root / "mlp.onnx"))
    assert len(smoothing_groups(model)) == 3
    before = hashlib.sha256((root / "mlp.onnx").read_bytes()).hexdigest()
    output = tmp_path / "q.onnx"
    data = [{"x": x * 10} for x in batches(root)]
    result = calibrate_onnx(root / "mlp.onnx", data, format="int8", smooth=0.5, output=output)
    assert hashlib.sha256((root / "mlp.onnx").read_bytes()).hexdigest() == before
    notes = result.report["smoothing"]["notes"]
    assert len(notes) == 3 and all("Mul" in note for note in notes)
    quantized = onnx.load(str(output))
    muls = [n for n in quantized.graph.node if n.op_type == "Mul" and "smoothed" in n.output[0]]
    assert len(muls) == 3 and all(m.output[0] in result.scales for m in muls)
    assert result.report["output_error"]["y"]["cosine"] > 0.99
    weights = {t.name: t for t in model.graph.initializer}
    rng = np.random.default_rng(2)
    amax = {
        tensor: rng.lognormal(0, 2, weights[users[0].weight].dims[users[0].axis])
        for tensor, users in smoothing_groups(model).items()
    }
    smoothed, _ = smooth_model(model, amax, 0.3)
    x = data[0]["x"]
    np.testing.assert_allclose(
        run(smoothed, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5
    )


def test_bad_alpha_channel_count_and_saved_scales(tmp_path):
    root = make_mlp(tmp_path, seq=True)
    with pytest.raises(RecipeError, match="scales_in"):
        calibrate_onnx(root / "mlp.onnx", root / "data", smooth=0.5, scales_in=tmp_path / "s")
    model = layernorm_model(False)
    with pytest.raises(RecipeError, match="alpha"):
        smooth_model(model, {"h": np.ones(8)}, 1.0)
    with pytest.raises(RecipeError, match="7 channels"):
        smooth_model(model, {"h": np.ones(7)}, 0.5)


def test_a_chain_of_matmuls_smooths_each_on_the_weights_as_they_stand():
    """a -> p -> h -> c: both activations smoothed; p's weight takes a's factors on its rows
    and h's on its columns, whatever the order the groups come in."""
    model = producer_model("matmul")
    amax = {"a": np.array([4.0, 0.1, 1.0, 9.0, 0.3, 2.0]), "h": np.linspace(0.1, 20, 8)}
    smoothed, notes = smooth_model(model, amax, 0.6)
    assert len(notes) == 2
    a = np.random.default_rng(5).normal(0, 2, (5, 6)).astype(np.float32)
    np.testing.assert_allclose(run(smoothed, {"a": a})[0], run(model, {"a": a})[0], rtol=1e-5)
    weights = {t.name for t in smoothed.graph.initializer}
    assert {"w0", "w1"}.isdisjoint(weights)  # both replaced, the originals dropped

"""A placement that collapses a model (LayerNorm written as Mul/Add, as jax2tf exports it) falls
back to the compute ops; one that holds is kept."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qcal_export import calibrate_onnx

RNG = np.random.default_rng(7)


def decomposed_layernorm_model() -> onnx.ModelProto:
    """x -> MatMul -> LayerNorm as ReduceMean/Sub/Mul/Add/Sqrt/Div/Mul -> MatMul -> y. Rows of
    zeros give a variance of 0 and a reciprocal standard deviation of 1/sqrt(eps) = 1000."""
    init = [
        numpy_helper.from_array(RNG.standard_normal((16, 32)).astype(np.float32), "w1"),
        numpy_helper.from_array(RNG.standard_normal((32, 8)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(RNG.uniform(0.5, 1.5, 32).astype(np.float32), "gamma"),
        numpy_helper.from_array(RNG.uniform(-0.1, 0.1, 32).astype(np.float32), "beta"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("ReduceMean", ["h"], ["mean"], name="mean", axes=[-1]),
        helper.make_node("Sub", ["h", "mean"], ["d"], name="sub"),
        helper.make_node("Mul", ["d", "d"], ["d2"], name="square"),
        helper.make_node("ReduceMean", ["d2"], ["var"], name="var", axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="add_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="sqrt"),
        helper.make_node("Div", ["one", "std"], ["rstd"], name="rstd"),
        helper.make_node("Mul", ["d", "rstd"], ["normed"], name="normalize"),
        helper.make_node("Mul", ["normed", "gamma"], ["scaled"], name="gamma_mul"),
        helper.make_node("Add", ["scaled", "beta"], ["shifted"], name="beta_add"),
        helper.make_node("MatMul", ["shifted", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "decomposed_layernorm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        init,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def batches(count: int = 10) -> list[dict[str, np.ndarray]]:
    out = []
    for _ in range(count):
        x = RNG.standard_normal((8, 16)).astype(np.float32)
        x[:2] = 0.0  # padding rows: variance 0
        out.append({"x": x})
    return out


def quantized_readers(path) -> set[str]:
    """Nodes of the written model that read a DequantizeLinear output."""
    model = onnx.load(str(path))
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in model.graph.node if set(n.input) & dq}


def ort_cosine(float_path, quantized_path, feed) -> float:
    """The quantized model's output cosine against the float model's, as ORT computes them."""
    cpu = ["CPUExecutionProvider"]
    ref = ort.InferenceSession(str(float_path), providers=cpu).run(None, feed)[0].ravel()
    out = ort.InferenceSession(str(quantized_path), providers=cpu).run(None, feed)[0].ravel()
    return float(np.dot(ref, out) / np.linalg.norm(ref) / np.linalg.norm(out))


def test_a_collapsing_placement_falls_back_to_the_compute_ops(tmp_path):
    path = tmp_path / "ln.onnx"
    onnx.save(decomposed_layernorm_model(), str(path))
    data = batches()
    # Unvalidated, the placement is written as planned: one scale for rstd (up to 1000 on the
    # zero rows) rounds every other row's rstd to 0 or one step.
    calibrate_onnx(path, data, output=tmp_path / "kept.onnx", target="ort", validate_batches=0)
    assert "normalize" in quantized_readers(tmp_path / "kept.onnx")
    assert ort_cosine(path, tmp_path / "kept.onnx", data[4]) < 0.5
    fell = calibrate_onnx(path, data, output=tmp_path / "fell.onnx", target="ort")
    assert fell.report["verdict"]["status"] == "pass"
    assert fell.report["verdict"]["cosine"] > 0.99
    # mm1's output stays quantized for its float readers: part of the compute op's placement.
    assert quantized_readers(tmp_path / "fell.onnx") == {"mm1", "mean", "sub", "mm2"}
    assert set(fell.report["quantized_nodes"]) == {"mm1", "mm2"}
    notes = [n for n in fell.report["export_notes"] if n.startswith("placement:")]
    assert len(notes) == 1 and "normalize" in notes[0]
    assert ort_cosine(path, tmp_path / "fell.onnx", data[4]) > 0.99


def test_a_placement_that_holds_is_kept(tmp_path):
    path = tmp_path / "ln.onnx"
    onnx.save(decomposed_layernorm_model(), str(path))
    data = [{"x": RNG.standard_normal((8, 16)).astype(np.float32)} for _ in range(10)]
    result = calibrate_onnx(path, data, target="ort", min_cosine=0.5)
    assert not [n for n in result.report["export_notes"] if n.startswith("placement:")]
    assert "normalize" in result.report["quantized_nodes"]


def test_a_small_gain_keeps_the_placement(tmp_path):
    # Below a strict min_cosine the compute-ops model is a little closer to float, but the
    # placement does not cost most of the error: its integer kernels stay.
    path = tmp_path / "ln.onnx"
    onnx.save(decomposed_layernorm_model(), str(path))
    data = [{"x": RNG.standard_normal((8, 16)).astype(np.float32)} for _ in range(10)]
    result = calibrate_onnx(path, data, target="ort", min_cosine=0.999999)
    assert result.report["verdict"]["status"] == "below target"
    assert not [n for n in result.report["export_notes"] if n.startswith("placement:")]
    assert "normalize" in result.report["quantized_nodes"]

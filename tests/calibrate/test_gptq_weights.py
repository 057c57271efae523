"""GPTQ weights through a whole run (calibrate/gptq_weights.py): the exported codes and scales
are GPTQ's own, computed here from the data's ``Xᵀ X`` in float64; ORT runs the model and gives
``X @ W_gptq``; the input model file is untouched; on the LLM-shaped benchmark model the
held-out output error is no worse than round to nearest's."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from llm_benchmark import load_llm_model
from onnx import TensorProto, helper, numpy_helper

from qcal_export.calibrators.gptq import GptqCalibrator
from qcal_export.pipeline.calibrate import calibrate_onnx
from qcal_export.spec.formats import get_format
from qcal_export.spec.granularity import PerAxis, PerBlock

K, N, TOKENS = 64, 24, 40


def two_layer_model(folder: Path) -> Path:
    """``y = (x @ W1) @ W2ᵀ``: a MatMul (weight [K, N]) and a Gemm with transB=1 (weight
    [K, N], its reduction axis 1), with correlated inputs in data/ (4 batches)."""
    gen = np.random.default_rng(0)
    w1 = gen.standard_normal((K, N)).astype(np.float32)
    w2 = gen.standard_normal((K, N)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], "mm"),
            helper.make_node("Gemm", ["h", "w2"], ["y"], "gemm", transB=1),
        ],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", K])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    (folder / "data").mkdir()
    mix = gen.standard_normal((K, K)) / K**0.5 + np.eye(K)
    for i in range(4):
        x = (gen.standard_normal((TOKENS, K)) @ mix) * (gen.random(K) * 3 + 0.2)
        np.savez(folder / "data" / f"b{i}.npz", x=x.astype(np.float32))
    return path


def stacked_inputs(folder: Path) -> np.ndarray:
    return np.concatenate([np.load(p)["x"] for p in sorted((folder / "data").glob("*.npz"))])


@pytest.mark.parametrize(
    "fmt, block_size, options",
    [
        ("int4", 16, {}),
        ("uint4", 16, {"act_order": 1, "lazy_block": 10}),
        ("int8", None, {"percdamp": 0.05}),
    ],
)
def test_exported_codes_and_scales_are_gptqs(tmp_path, fmt, block_size, options):
    path = two_layer_model(tmp_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    out = tmp_path / "q.onnx"
    calibrate_onnx(
        path,
        tmp_path / "data",
        format=fmt,
        activation_format="none",
        weight_method="gptq",
        block_size=block_size,
        method_options=options,
        output=out,
        validate_batches=0,
    )
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    q = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    dq = {n.output[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    readers = {n.name: n for n in q.graph.node}
    x = torch.from_numpy(stacked_inputs(tmp_path)).double()
    w1 = torch.from_numpy(numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0]).copy())
    # The MatMul's input is x itself: its Hessian is known here; the Gemm's is GPTQ'd W1's
    # output, checked below through ORT.
    cal = GptqCalibrator(
        get_format(fmt),
        PerBlock(0, block_size) if block_size else PerAxis(1),
        hessian=x.T @ x,
        reduction_axis=0,
        **options,
    )
    cal.collect(w1)
    node = dq[readers["mm"].input[1]]
    assert np.array_equal(inits[node.input[0]].astype(np.int64), cal.codes().numpy())
    scale, zero_point = get_format(fmt).scale_zero_point(*cal.compute_range())
    assert np.array_equal(inits[node.input[1]], scale.numpy())
    assert np.array_equal(inits[node.input[2]].astype(np.int64), zero_point.numpy())

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x[:7].float().numpy()})
    w2 = dq[readers["gemm"].input[1]]
    w2_scale = torch.from_numpy(inits[w2.input[1]].copy())
    codes = torch.from_numpy(inits[w2.input[0]].astype(np.float32))
    zero = torch.from_numpy(inits[w2.input[2]].astype(np.float32))
    granularity = PerBlock(1, block_size) if block_size else PerAxis(0)
    shape = tuple(codes.shape)
    w2_float = (codes - granularity.expand(zero, shape)) * granularity.expand(w2_scale, shape)
    want = (x[:7].float() @ cal.compensated_weight()) @ w2_float.T
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


def test_llm_heldout_error_is_no_worse_than_nearest(tmp_path):
    """int4 blocks of 32, weights only, on the tiny LLM: held-out logits' relative L2 error
    with gptq at most max's (round to nearest), both validated in ORT."""
    model = load_llm_model().build("tiny", tmp_path / "llm", batches=6, seq=32)
    errors = {}
    for method in ("max", "gptq"):
        result = calibrate_onnx(
            model,
            model.parent / "data",
            format="int4",
            activation_format="none",
            weight_method=method,
            block_size=32,
            output=tmp_path / f"{method}.onnx",
            validate_batches=2,
        )
        validation = result.report["validation"]
        assert validation["runtime_issue"] is None
        assert validation["held_out"]
        errors[method] = [validation[run]["logits"]["rel_l2"] for run in ("default", "reference")]
        rows = [r for r in result.report["tensors"] if r["kind"] == "weight"]
        assert rows and all(r["method"] == method for r in rows)
    assert all(g <= m for g, m in zip(errors["gptq"], errors["max"], strict=True)), errors


@pytest.mark.parametrize("batches", [1, 4])
def test_a_hessian_of_fewer_rows_than_inputs_is_noted(tmp_path, batches, caplog):
    """One batch gives the MatMul 40 rows of its 64 inputs: its H is singular, and its record
    (and the log) says GPTQ fits the calibration data; the Gemm reduces over 24 inputs, which
    40 rows cover, and four batches (160 rows) cover both."""
    path = two_layer_model(tmp_path)
    result = calibrate_onnx(
        path,
        tmp_path / "data",
        max_batches=batches,
        format="int4",
        activation_format="none",
        weight_method="gptq",
        block_size=8,
        validate_batches=0,
    )
    notes = {
        r["tensor"]: [n for n in r.get("notes", []) if "input rows" in n]
        for r in result.report["tensors"]
        if r["kind"] == "weight"
    }
    want = f"gptq: its Hessian sums {TOKENS} input rows for {K} inputs, so it is singular"
    if batches == 1:
        assert len(notes["w1"]) == 1 and notes["w1"][0].startswith(want)
        assert notes["w2"] == []
        assert sum(r.getMessage().startswith(f"w1: {want}") for r in caplog.records) == 1
    else:
        assert notes == {"w1": [], "w2": []}

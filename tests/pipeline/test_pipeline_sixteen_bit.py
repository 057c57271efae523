"""A16W8 end to end: calibrate_onnx with 16-bit activations and int8 weights on the small torch
MLP (MatMul) and the Conv + Gemm model, checked by onnx's checker and run in ONNX Runtime (CPU)
against the float model's outputs in ORT: much closer to them than A8W8 on the same model,
with every activation method; 16-bit weights too.

The oracles are ORT on the float model, ORT with its optimizations off and the ONNX reference
evaluator on the written model, and each calibrator run on the captured input by itself.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from convgemm import data_batches, make_workdir
from mlp import batches as mlp_batches
from mlp import make_mlp
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

from qcal_export import calibrate_onnx
from qcal_export.calibrators import CALIBRATORS, MaxCalibrator
from qcal_export.spec.formats import get_format
from qcal_export.spec.granularity import PerTensor

CPU = ["CPUExecutionProvider"]
METHODS = ["max", "mse", "hist-mse", "shrink-mse", "percentile", "entropy", "auto"]
STORED = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8}
STORED |= {"int16": TensorProto.INT16, "uint16": TensorProto.UINT16}


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return make_mlp(tmp_path_factory.mktemp("mlp"), seq=True)


@pytest.fixture(scope="module")
def convgemm(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("convgemm"))


def run(path, x: np.ndarray, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    return ort.InferenceSession(str(path), options, providers=CPU).run(None, {"x": x})[0]


def rel_l2(model, float_model, batches) -> float:
    """Relative L2 error of ``model``'s outputs in ORT (default optimizations) against the float
    model's, over all batches."""
    got = np.concatenate([run(model, x).ravel() for x in batches]).astype(np.float64)
    want = np.concatenate([run(float_model, x).ravel() for x in batches]).astype(np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def stored_types(model: onnx.ModelProto) -> dict[str, set[int]]:
    """The stored types of the activations' QuantizeLinear, of the MatMul weights and of the
    other constants (ORT's placement quantizes the Adds' biases as activations)."""
    initializers = {t.name: t for t in model.graph.initializer}
    types: dict[str, set[int]] = {"activations": set(), "weights": set(), "constants": set()}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            types["activations"].add(initializers[node.input[2]].data_type)
        elif node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            kind = "weights" if "MatMul" in node.input[0] else "constants"
            types[kind].add(initializers[node.input[0]].data_type)
    return types


@pytest.mark.parametrize("activations", ["int16", "uint16"])
def test_a16w8_is_much_closer_to_float_than_a8w8(mlp, tmp_path, activations):
    """The activations of 16 bits, the weights int8 per channel: ORT at its default
    optimizations computes the graph as written (as with its optimizations off, and the
    reference evaluator's values), and its error against the float model is a fraction of
    A8W8's, signed or not."""
    model, data, batches = mlp / "mlp.onnx", mlp / "data", mlp_batches(mlp)
    errors = {}
    for fmt in ("int8", "uint8", activations):
        out = tmp_path / f"{fmt}.onnx"
        result = calibrate_onnx(model, data, activation_format=fmt, output=out, provider="cpu")
        assert result.report["validation"]["runtime_issue"] is None
        errors[fmt] = rel_l2(out, model, batches)
    written = onnx.load(str(tmp_path / f"{activations}.onnx"))
    onnx.checker.check_model(written, full_check=True)
    assert written.opset_import[0].version == 21
    assert stored_types(written) == {
        "activations": {STORED[activations]},
        "weights": {TensorProto.INT8},
        "constants": {STORED[activations]},
    }
    assert errors[activations] < 0.4 * min(errors["int8"], errors["uint8"])
    assert result.report["output_error"]["y"]["rel_l2"] == pytest.approx(errors[activations])
    path = tmp_path / f"{activations}.onnx"
    reference = ReferenceEvaluator(written)
    for x in batches:
        default = run(path, x)
        off = run(path, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        (ref,) = reference.run(None, {"x": x})
        np.testing.assert_array_equal(default, off)
        # float sums in another order can move a value across a rounding boundary of the
        # 16-bit grid (a step of range / 65535) in a later layer: a few such steps at most
        np.testing.assert_allclose(default, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_its_16_bit_scales_to_the_graph(convgemm, tmp_path, method):
    """Each method's scales of the graph input equal its calibrator's run on the data by itself
    (``auto``: the method it chose), and every activation's scale in the graph is its range
    over the 16-bit levels; the verdict passes."""
    out = tmp_path / "q.onnx"
    result = calibrate_onnx(
        convgemm / "model.onnx",
        convgemm / "data",
        activation_format="int16",
        method=method,
        output=out,
        provider="cpu",
    )
    assert result.report["verdict"]["status"] == "pass"
    scales = result.scales["x"]
    chosen = scales.method
    assert chosen in METHODS[:-1] and (chosen == method or method == "auto")
    cal = CALIBRATORS[chosen](get_format("int16"), PerTensor())
    batches = [torch.from_numpy(x) for x in data_batches(convgemm)]
    if cal.needs_initial_range:
        first = MaxCalibrator(get_format("int16"), PerTensor())
        for x in batches:
            first.collect(x)
        cal.set_initial_range(*first.compute_range())
    for x in batches:
        cal.collect(x)
    assert torch.equal(scales.amax, cal.compute_amax())
    written = onnx.load(str(out))
    initializers = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    for node in written.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        found = result.scales[node.input[0]]
        assert found.format == "int16"
        assert initializers[node.input[2]].dtype == np.int16
        assert initializers[node.input[1]] == np.float32(found.amax.item() / np.float32(32767))


@pytest.mark.parametrize("weights", ["int16", "uint16"])
def test_16_bit_weights_are_stored_in_16_bits(mlp, tmp_path, weights):
    """A16W16: weights per channel in 16 bits (uint16 with a zero point per channel), run by
    ORT as written; closer to float than A16W8."""
    model, data, batches = mlp / "mlp.onnx", mlp / "data", mlp_batches(mlp)
    out = tmp_path / "w16.onnx"
    result = calibrate_onnx(
        model, data, activation_format="int16", weight_format=weights, output=out, provider="cpu"
    )
    assert result.report["validation"]["runtime_issue"] is None
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert stored_types(written)["weights"] == {STORED[weights]}
    a16w8 = tmp_path / "w8.onnx"
    calibrate_onnx(model, data, activation_format="int16", output=a16w8, provider="cpu")
    assert rel_l2(out, model, batches) < 0.1 * rel_l2(a16w8, model, batches)

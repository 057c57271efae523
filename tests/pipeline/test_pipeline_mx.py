"""calibrate_onnx and ``qcal calibrate`` with MX weights (mxfp8, mxfp4; activations in float) on
a real exported MLP (MatMul and Gemm, a partial last block of 8): the written model holds the
elements and E8M0 scales at opset 24, the reference evaluator computes the float64 brute force's
weights (mx_oracle.py), and the validation figures come from ORT over the emulation."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mlp import batches, make_mlp
from mx_oracle import brute_force
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

from qcal_export.calibrate.runtime_scales import RUNTIME_NOTE
from qcal_export.cli import main
from qcal_export.pipeline.calibrate import calibrate_onnx
from qcal_export.validation.fp4_runner import emulation_validator

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module", params=[True, False], ids=["matmul", "gemm"])
def mlp(request, tmp_path_factory):
    return make_mlp(tmp_path_factory.mktemp("mlp"), seq=request.param)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def brute_force_weights(source: onnx.ModelProto, written: onnx.ModelProto, name: str) -> dict:
    """Each float weight of ``source`` that ``written`` quantized, as the brute force gives it
    (blocks along the reduction axis: MatMul's axis 0, Gemm transB's axis 1)."""
    expected = {}
    for node in written.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        axis = next(a.i for a in node.attribute if a.name == "axis")
        weight_name = node.output[0].removesuffix("_dequantized")
        init = next(t for t in source.graph.initializer if t.name == weight_name)
        weight = numpy_helper.to_array(init)
        along_rows = weight if axis == 0 else weight.T
        values, _ = brute_force(along_rows, name)
        expected[node.output[0]] = values if axis == 0 else values.T
    return expected


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_weight_only_mx_end_to_end(mlp, tmp_path, fmt):
    out = tmp_path / "q.onnx"
    result = calibrate_onnx(
        mlp / "mlp.onnx", mlp / "data", weight_format=fmt, activation_format="none", output=out
    )
    report = result.report
    assert report["validator"] == emulation_validator(CPU)
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert next(e.version for e in written.opset_import if e.domain == "") == 24
    types = [t.data_type for t in written.graph.initializer]
    element = TensorProto.FLOAT8E4M3FN if fmt == "mxfp8" else TensorProto.FLOAT4E2M1
    assert types.count(TensorProto.FLOAT8E8M0) == types.count(element) == 3
    # The dequantized weights, read from the evaluator, are the brute force's.
    source = onnx.load(str(mlp / "mlp.onnx"))
    expected = brute_force_weights(source, written, fmt)
    assert len(expected) == 3
    probe = onnx.ModelProto()
    probe.CopyFrom(written)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in expected)
    x = batches(mlp)[0]
    got = ReferenceEvaluator(probe).run(list(expected), {"x": x})
    for name, values in zip(expected, got, strict=True):
        np.testing.assert_array_equal(values.astype(np.float64), expected[name], err_msg=name)
    # The report's cosine is ORT's (emulation) against the float model, over all batches.
    float_session = ort.InferenceSession(str(mlp / "mlp.onnx"), providers=CPU)
    evaluator = ReferenceEvaluator(written)
    reference = np.concatenate([float_session.run(None, {"x": b})[0] for b in batches(mlp)])
    quantized = np.concatenate([evaluator.run(None, {"x": b})[0] for b in batches(mlp)])
    assert report["output_error"]["y"]["cosine"] == pytest.approx(cosine(reference, quantized))
    assert report["output_error"]["y"]["cosine"] > 0.95


def first_activation(written: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The dequantized graph input ``x`` as the reference evaluator computes it."""
    probe = onnx.ModelProto()
    probe.CopyFrom(written)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info("x_dequantized"))
    return ReferenceEvaluator(probe).run(["x_dequantized"], {"x": x})[0]


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_mx_activations_end_to_end(mlp, tmp_path, fmt):
    """``format`` MX: activations get their E8M0 scales in the graph (no capture pass, no
    calibrator: the report says so), the evaluator's first activation is the brute force's,
    the saved scales reload, and ORT over the emulation validates."""
    out, scales = tmp_path / "q.onnx", tmp_path / "q.safetensors"
    result = calibrate_onnx(mlp / "mlp.onnx", mlp / "data", format=fmt, output=out, scales=scales)
    report = result.report
    assert report["validator"] == emulation_validator(CPU)
    assert report["batches_per_pass"] == []
    rows = [row for row in report["tensors"] if row["kind"] == "activation"]
    assert len(rows) == 3 and {row["format"] for row in rows} == {fmt}
    assert all(row["notes"] == [RUNTIME_NOTE] and row["amax"] == 0 for row in rows)
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    to_e8m0 = [
        n
        for n in written.graph.node
        if n.op_type == "Cast"
        and any(a.name == "to" and a.i == TensorProto.FLOAT8E8M0 for a in n.attribute)
    ]
    assert len(to_e8m0) == 2 * 3  # two per activation
    x = batches(mlp)[0]
    axis = x.ndim - 1
    moved = np.moveaxis(x, axis, 0)
    want, _ = brute_force(moved.reshape(moved.shape[0], -1), fmt)
    want = np.moveaxis(want.reshape(moved.shape), 0, axis)
    np.testing.assert_array_equal(first_activation(written, x).astype(np.float64), want)
    float_session = ort.InferenceSession(str(mlp / "mlp.onnx"), providers=CPU)
    evaluator = ReferenceEvaluator(written)
    reference = np.concatenate([float_session.run(None, {"x": b})[0] for b in batches(mlp)])
    quantized = np.concatenate([evaluator.run(None, {"x": b})[0] for b in batches(mlp)])
    assert report["output_error"]["y"]["cosine"] == pytest.approx(cosine(reference, quantized))
    again = tmp_path / "again.onnx"
    calibrate_onnx(mlp / "mlp.onnx", None, format=fmt, output=again, scales_in=scales)
    assert (
        first_activation(onnx.load(str(again)), x).tobytes()
        == first_activation(written, x).tobytes()
    )


def test_the_cli_writes_mx_weights_and_activations(mlp, tmp_path, capsys):
    """``--format mxfp4``: both MX; ``--activation-format mxfp8`` with int8 weights: MX
    activations alone, which ORT cannot run either: the emulation validates both."""
    argv = ["calibrate", str(mlp / "mlp.onnx"), "--data", str(mlp / "data")]
    assert main([*argv, "-o", str(tmp_path / "a.onnx"), "--format", "mxfp4"]) == 0
    written = onnx.load(str(tmp_path / "a.onnx"))
    assert TensorProto.FLOAT8E8M0 in {t.data_type for t in written.graph.initializer}
    assert "fp4 emulation" in capsys.readouterr().out
    mixed = [*argv, "-o", str(tmp_path / "b.onnx"), "--format", "int8"]
    assert main([*mixed, "--activation-format", "mxfp8"]) == 0
    written = onnx.load(str(tmp_path / "b.onnx"))
    assert TensorProto.FLOAT8E8M0 not in {t.data_type for t in written.graph.initializer}
    assert any(n.op_type == "Cast" for n in written.graph.node)
    assert "fp4 emulation" in capsys.readouterr().out


@pytest.mark.parametrize("activation_format", ["mxfp8", "none"])
def test_a_run_that_captures_nothing_validates_on_batches_it_did_not_calibrate_on(
    mlp, activation_format
):
    """MX activations (their scales computed in the graph) or weights alone: no capture pass
    runs, so batches too few to hold one out were never calibrated on, and the verdict says so
    instead of "calibrated on"."""
    data = [{"x": x} for x in batches(mlp)[:3]]
    result = calibrate_onnx(
        mlp / "mlp.onnx",
        data,
        format="mxfp8",
        activation_format=activation_format,
        validate_batches=3,
    )
    assert result.report["batches_per_pass"] == []
    validation = result.report["validation"]
    assert validation["held_out"] is True
    assert "no activation was calibrated on the data" in validation["batches"]
    line = result.report["verdict"]["line"]
    assert "3 batches of the data, no activation calibrated on it" in line
    assert "calibrated on (too few" not in line

"""calibrate_onnx writes the runtime_cases.py models in forms ONNX Runtime's default
optimizations run as written (same QDQ math: default equals the reference), leaves the plain form
where ORT runs it, and where no form helps (8-bit weight-only MatMul, which ORT's MatMulNBits
computes with int8 activations) keeps the model, warns once, and under ``strict`` raises
RuntimeMismatchError after writing the model and the report."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mlp import make_mlp
from runtime_cases import conv_relu_fp8_case, matmul_case
from subgraph_models import batches as subgraph_batches
from subgraph_models import subgraph_model

from qcal_export import calibrate_onnx
from qcal_export.errors import RuntimeMismatchError

CPU = ["CPUExecutionProvider"]


def calibrate(float_model: onnx.ModelProto, batches, tmp_path, **options):
    path = tmp_path / "float.onnx"
    onnx.save(float_model, str(path))
    out = tmp_path / "q.onnx"
    result = calibrate_onnx(path, batches, output=out, provider="cpu", **options)
    return result, onnx.load(str(out))


def run(model: onnx.ModelProto, batch: dict, level=None) -> np.ndarray:
    options = ort.SessionOptions()
    if level is not None:
        options.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), options, providers=CPU).run(None, batch)[
        0
    ]


def assert_default_is_the_reference(result, model, batches):
    validation = result.report["validation"]
    assert validation["runtime_issue"] is None
    assert result.report["output_error"] == validation["default"]
    for name, ref in validation["reference"].items():
        assert validation["default"][name]["rel_l2"] == pytest.approx(ref["rel_l2"], rel=1e-4)
    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for batch in batches:
        want = run(model, batch, off)
        np.testing.assert_allclose(run(model, batch), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("fmt", ["int8", "uint8"])
@pytest.mark.parametrize("batched", [False, True], ids=["block-weight", "3d-weight"])
def test_8bit_matmul_weights_ort_cannot_fuse_are_written_behind_a_reshape(
    tmp_path, caplog, fmt, batched
):
    case = matmul_case(fmt == "int8", batched)
    options = {} if batched else {"block_size": 32}
    with caplog.at_level(logging.WARNING):
        result, model = calibrate(case.float_model, case.batches, tmp_path, format=fmt, **options)
    assert not caplog.records
    nodes = {n.output[0]: n for n in model.graph.node}
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    reshape = nodes[matmul.input[1]]
    assert reshape.op_type == "Reshape" and nodes[reshape.input[0]].op_type == "DequantizeLinear"
    shape = next(t for t in model.graph.initializer if t.name == reshape.input[1])
    assert list(onnx.numpy_helper.to_array(shape)) == list(
        case.float_model.graph.initializer[0].dims
    )
    assert any("MatMulIntegerToFloat" in note for note in result.report["export_notes"])
    assert_default_is_the_reference(result, model, case.batches)


@pytest.mark.parametrize("activations", ["int16", "uint16"])
@pytest.mark.parametrize("block_size", [None, 32], ids=["per-channel", "block"])
def test_8bit_matmul_weights_behind_16bit_activations_are_written_behind_a_reshape(
    tmp_path, caplog, activations, block_size
):
    """ORT's MatMulNBits fusion takes ``DQ(int8 weight) -> MatMul`` and, at its default
    accuracy level 4, quantizes the 16-bit activations to int8; behind the Reshape ORT computes
    the graph as written. 16-bit weights are not fused: they stay plain."""
    case = matmul_case(True, False)
    options = {"activation_format": activations, "block_size": block_size}
    with caplog.at_level(logging.WARNING):
        result, model = calibrate(case.float_model, case.batches, tmp_path, **options)
    assert not caplog.records
    nodes = {n.output[0]: n for n in model.graph.node}
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    reshape = nodes[matmul.input[1]]
    assert reshape.op_type == "Reshape" and nodes[reshape.input[0]].op_type == "DequantizeLinear"
    assert nodes[matmul.input[0]].op_type == "DequantizeLinear"
    assert any("MatMulNBits" in note for note in result.report["export_notes"])
    assert_default_is_the_reference(result, model, case.batches)
    result, model = calibrate(case.float_model, case.batches, tmp_path, format=activations)
    assert "Reshape" not in {n.op_type for n in model.graph.node}
    assert result.report["export_notes"] == []
    assert_default_is_the_reference(result, model, case.batches)


def test_fp8_after_a_relu_is_quantized_without_zero_point_at_opset_21(tmp_path, caplog):
    case = conv_relu_fp8_case()
    with caplog.at_level(logging.WARNING):
        result, model = calibrate(
            case.float_model, case.batches, tmp_path, format="fp8", target="tensorrt"
        )
    assert not caplog.records
    assert result.report["opset"] == {"from": 19, "to": 21}
    quantizers = {n.input[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    after_relu = quantizers["r"]
    assert len(after_relu.input) == 2
    assert [(a.name, a.i) for a in after_relu.attribute] == [
        ("output_dtype", onnx.TensorProto.FLOAT8E4M3FN)
    ]
    assert len(quantizers["x"].input) == 3  # the graph input keeps its zero point
    assert_default_is_the_reference(result, model, case.batches)
    assert result.report["output_error"]["y"]["rel_l2"] < 0.1


def test_forms_ort_runs_as_written_stay_plain(tmp_path):
    """2-D per-channel int8 MatMul weights, int4 weight-only blocks and fp8 not after a Relu
    keep the plain QDQ form and their opset."""
    case = matmul_case(True, False)
    result, model = calibrate(case.float_model, case.batches, tmp_path, format="int8")
    assert "Reshape" not in {n.op_type for n in model.graph.node}
    assert result.report["export_notes"] == []
    assert_default_is_the_reference(result, model, case.batches)
    _, model = calibrate(case.float_model, case.batches, tmp_path, format="int4", block_size=32)
    assert "Reshape" not in {n.op_type for n in model.graph.node}
    result, model = calibrate(case.float_model, case.batches, tmp_path, format="fp8")
    assert result.report["opset"]["to"] == 19
    assert all(len(n.input) == 3 for n in model.graph.node if n.op_type == "QuantizeLinear")


def test_subgraph_model_runs_as_written(tmp_path, caplog):
    """(d) If and Loop bodies reading the main graph's tensors: ORT 1.32's default session
    agrees with the reference to float noise."""
    with caplog.at_level(logging.WARNING):
        result, model = calibrate(subgraph_model(), subgraph_batches(), tmp_path, format="int8")
    assert not any("runtime" in r.getMessage() for r in caplog.records)
    assert_default_is_the_reference(result, model, subgraph_batches())


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return make_mlp(tmp_path_factory.mktemp("mlp"), seq=True)


def test_weight_only_int8_matmul_warns_once_and_strict_raises_after_writing(mlp, tmp_path, caplog):
    """ORT's MatMulNBits computes 8-bit weight-only MatMuls with int8-quantized activations
    (accuracy level 4): twice the graph's error. No QDQ form keeps ORT's kernel exact: warn."""
    options = {"format": "int8", "activation_format": "none", "provider": "cpu"}
    with caplog.at_level(logging.WARNING):
        result = calibrate_onnx(mlp / "mlp.onnx", mlp / "data", **options)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "the runtime, not the scales, is at fault" in warnings[0]
    validation = result.report["validation"]
    issue = validation["runtime_issue"]
    assert (issue["kind"], issue["optimizer"]) == ("disagrees", "QDQSelectorActionTransformer")
    assert any(change.endswith("-> MatMulNBits") for change in issue["changes"])
    default, reference = validation["default"]["y"], validation["reference"]["y"]
    assert default["rel_l2"] > 1.5 * reference["rel_l2"]
    assert result.report["output_error"]["y"] == default

    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    with pytest.raises(RuntimeMismatchError, match=r"^--strict: .*MatMulNBits") as raised:
        calibrate_onnx(
            mlp / "mlp.onnx", mlp / "data", output=out, report=report, strict=True, **options
        )
    assert raised.value.exit_code == 3
    assert onnx.load(str(out)).graph.node
    written = json.loads(report.read_text())
    assert written["validation"]["runtime_issue"]["optimizer"] == "QDQSelectorActionTransformer"
    assert str(raised.value).endswith(f"; written: {out}, {report}")

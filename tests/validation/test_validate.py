"""validate_outputs on the plain QDQ forms ONNX Runtime 1.32's default optimizations fail on or
miscompute (runtime_cases.py): the reference (ORT with optimizations off) gives the float64
error of the QDQ math, the default session's fault is one warning naming the ORT optimizer and
the node it rewrote, never a traceback; a model even the reference cannot run is a ModelError."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from runtime_cases import conv_relu_fp8_case, matmul_case

from qcal_export.capture.data import open_data
from qcal_export.errors import ModelError
from qcal_export.validation.fp4_runner import emulation_validator
from qcal_export.validation.runtime_check import _single_culprit, worse_than_reference
from qcal_export.validation.validate import validate_outputs

CPU = ["CPUExecutionProvider"]


def validate(case, tmp_path: Path, model: onnx.ModelProto | None = None):
    path = tmp_path / "float.onnx"
    onnx.save(case.float_model, str(path))
    qdq = case.qdq_model if model is None else model
    return validate_outputs(path, qdq, CPU, open_data(case.batches), 4, "the QDQ test model")


def one_warning(caplog) -> str:
    records = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(records) == 1
    assert "\n" not in records[0].getMessage()
    return records[0].getMessage()


@pytest.mark.parametrize("signed", [True, False], ids=["int8", "uint8"])
@pytest.mark.parametrize("batched", [False, True], ids=["block-weight", "3d-weight"])
def test_matmul_integer_to_float_fusion_fails_and_the_reference_validates(
    tmp_path, caplog, signed, batched
):
    """(a) block and (b) 3-D 8-bit MatMul weights: the default session fails at its first run;
    the reference's error is the float64 error of the QDQ math."""
    case = matmul_case(signed, batched)
    with caplog.at_level(logging.WARNING):
        validation = validate(case, tmp_path)
    assert validation.default is None
    assert validation.validator == "onnxruntime (CPUExecutionProvider, optimizations off)"
    assert validation.output_validator == validation.validator
    assert validation.output_error == validation.reference
    assert validation.reference["y"]["rel_l2"] == pytest.approx(case.rel_l2(), rel=1e-5)
    issue = validation.issue
    assert issue.kind == "fails" and "MatMulIntegerToFloat" in issue.error
    assert (issue.level, issue.optimizer) == ("extended", "QDQSelectorActionTransformer")
    assert issue.changes == ["MatMul 'mm' -> MatMulIntegerToFloat"]
    message = one_warning(caplog)
    assert message == issue.message
    assert "the runtime, not the scales, is at fault" in message
    assert "QDQSelectorActionTransformer" in message and "MatMulIntegerToFloat" in message


def test_relu_quant_fusion_drops_the_relu_before_fp8(tmp_path, caplog):
    """(c) the default session runs but computes without the Relu: far beyond the tolerance;
    the reference keeps the float64 error of the QDQ math."""
    case = conv_relu_fp8_case()
    with caplog.at_level(logging.WARNING):
        validation = validate(case, tmp_path)
    reference, default = validation.reference["y"], validation.default["y"]
    assert reference["rel_l2"] == pytest.approx(case.rel_l2(), rel=1e-4)
    assert default["rel_l2"] > 10 * reference["rel_l2"]
    assert validation.output_error == validation.default
    assert validation.output_validator == "onnxruntime (CPUExecutionProvider)"
    issue = validation.issue
    assert (issue.kind, issue.level) == ("disagrees", "extended")
    assert issue.optimizer == "Level2_RuleBasedTransformer"
    assert issue.changes == ["Relu 'relu' removed"]
    message = one_warning(caplog)
    assert f"rel L2 {default['rel_l2']:.3g}, {reference['rel_l2']:.3g} with optimizations off" in (
        message
    )
    report = validation.to_report()
    assert report["runtime_issue"] == issue.to_report()
    assert (report["default"], report["reference"]) == (validation.default, validation.reference)


def test_a_model_the_default_runs_as_written_has_no_issue(tmp_path, caplog):
    """The fp8 model without its Relu -> Q pattern: default and reference agree to float noise."""
    case = conv_relu_fp8_case()
    graph = case.qdq_model.graph
    relu = next(n for n in graph.node if n.op_type == "Relu")
    relu.op_type = "Identity"  # the Q now follows an Identity, which ORT removes first
    float_graph = case.float_model.graph
    next(n for n in float_graph.node if n.op_type == "Relu").op_type = "Identity"
    with caplog.at_level(logging.WARNING):
        validation = validate(case, tmp_path)
    assert validation.issue is None and not caplog.records
    ref, default = validation.reference["y"], validation.default["y"]
    assert default["rel_l2"] == pytest.approx(ref["rel_l2"], rel=1e-4)


def test_a_model_even_the_reference_cannot_load_is_a_model_error(tmp_path):
    case = matmul_case(True, False)
    broken = onnx.ModelProto()
    broken.CopyFrom(case.qdq_model)
    broken.graph.node[-1].domain = "com.example"
    broken.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(ModelError, match="ONNX Runtime cannot load the QDQ test model"):
        validate(case, tmp_path, broken)


def test_fp4_runs_in_its_emulation_alone(tmp_path):
    """ORT has no FLOAT4E2M1 kernels (an unused FP4 initializer is enough to tell): no default
    figures, no issue; ORT runs the FP4 emulation (which drops the unused initializer)."""
    case = matmul_case(True, False)
    fp4 = onnx.ModelProto()
    fp4.CopyFrom(case.qdq_model)
    fp4.opset_import[0].version = 23
    fp4.graph.initializer.append(
        helper.make_tensor("unused_fp4", TensorProto.FLOAT4E2M1, [2], np.zeros(2, np.float32))
    )
    validation = validate(case, tmp_path, fp4)
    emulation = emulation_validator(["CPUExecutionProvider"])
    assert (validation.validator, validation.default, validation.issue) == (emulation, None, None)
    assert validation.reference["y"]["rel_l2"] == pytest.approx(case.rel_l2(), rel=1e-5)


def test_worse_than_reference_allows_half_the_quantization_error_plus_a_norm_floor():
    quantization_sq, reference_sq = 0.01**2, 1.0
    margin = 1.5 * 0.01 + 1e-4
    assert not worse_than_reference((0.99 * margin) ** 2, quantization_sq, reference_sq)
    assert worse_than_reference((1.01 * margin) ** 2, quantization_sq, reference_sq)
    # Other rounding, as large as the quantization error, adds in quadrature: not at fault.
    assert not worse_than_reference(2 * quantization_sq, quantization_sq, reference_sq)
    assert not worse_than_reference((0.99e-4) ** 2, 0.0, 1.0)  # lossless: float32 rounding only
    assert worse_than_reference((1.01e-4) ** 2, 0.0, 1.0)


def test_the_search_finds_the_one_optimizer_whose_removal_cures():
    names = [f"T{i}" for i in range(11)]
    assert _single_culprit(lambda off: "T7" in off, names) == "T7"
    # a fault that needs two optimizers: removing either cures; the first in order is named
    assert _single_culprit(lambda off: "T2" in off or "T9" in off, names) == "T2"
    # two faults, each needing its own optimizer removed: no single one
    assert _single_culprit(lambda off: "T2" in off and "T9" in off, names) is None
    assert _single_culprit(lambda off: False, names) is None


def test_data_with_inf_gives_a_finite_error_and_one_warning(tmp_path, caplog):
    """An inf in the data makes some float outputs inf: the validation counts them (as ORT's
    float outputs say), keeps the error of the others finite, and warns once."""
    case = matmul_case(True, False)
    batches = [dict(b) for b in case.batches]
    first = next(iter(batches[0]))
    batches[0][first] = batches[0][first].copy()
    batches[0][first][0, 0] = np.inf
    path = tmp_path / "float.onnx"
    onnx.save(case.float_model, str(path))
    with caplog.at_level(logging.WARNING):
        validation = validate_outputs(path, case.qdq_model, CPU, open_data(batches), 4, "qdq")
    session = ort.InferenceSession(str(path), providers=CPU)
    outputs = [session.run(None, b)[0] for b in batches]
    want = sum(int((~np.isfinite(y)).sum()) for y in outputs)
    error = validation.reference["y"]
    assert want > 0
    assert error["nonfinite_float"] == want
    assert np.isfinite([error["max_abs"], error["rel_l2"], error["cosine"]]).all()
    assert 0 < error["rel_l2"] < 0.1
    messages = [r.getMessage() for r in caplog.records if "NaN or inf" in r.getMessage()]
    assert messages == [
        f"output 'y': {want} elements are NaN or inf in the float model itself (the data?); "
        "the error leaves them out"
    ]

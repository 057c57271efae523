"""Validation of FP4 models: ONNX Runtime over the FP4 emulation where it expresses the model
(same values as the ONNX reference evaluator), the evaluator with a note where it does not
(TensorRT's ops); the model written stays the FP4 QDQ graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from mlp import batches, make_mlp
from test_evaluator_budget import fp4_read_elsewhere

from qcal_export.capture.data import open_data
from qcal_export.graphs.fp4_emulation import emulate_fp4
from qcal_export.pipeline.calibrate import calibrate_onnx
from qcal_export.validation.fp4_runner import emulation_validator, fp4_runner
from qcal_export.validation.output_error import ErrorTally
from qcal_export.validation.reference import EVALUATOR, ReferenceRunner
from qcal_export.validation.validate import validate_outputs

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module", params=[False, True], ids=["gemm", "matmul"])
def mlp(request, tmp_path_factory):
    return make_mlp(tmp_path_factory.mktemp("mlp"), seq=request.param)


def test_the_run_validates_in_the_emulation_and_writes_the_fp4_model(mlp, tmp_path):
    out = tmp_path / "q.onnx"
    result = calibrate_onnx(mlp / "mlp.onnx", mlp / "data", format="nvfp4", output=out)
    report = result.report
    assert report["validator"] == emulation_validator(CPU)
    assert report["validation"]["validator"] == emulation_validator(CPU)
    assert report["validation"]["note"] is None
    written = onnx.load(str(out))
    types = {t.data_type for t in written.graph.initializer}
    assert onnx.TensorProto.FLOAT4E2M1 in types  # the deployed model is the real FP4 graph
    assert report["output_error"]["y"]["cosine"] > 0.9


@pytest.mark.parametrize("form", ["portable", "tensorrt"])
@pytest.mark.parametrize("mode", ["quantized", "qdq"])
def test_the_evaluator_computes_the_same_values_on_the_emulated_graph(mlp, tmp_path, mode, form):
    """On an exported multi-layer model (partial last blocks, dynamic batch) the emulated graph
    and the FP4 graph, both in the reference evaluator (the same float kernels), give the same
    outputs bit for bit: any difference in ORT comes from ORT's float kernels, not the
    emulation."""
    out = tmp_path / "q.onnx"
    options = {"format": "nvfp4", "weights_mode": mode, "nvfp4_form": form, "validate_batches": 0}
    calibrate_onnx(mlp / "mlp.onnx", mlp / "data", output=out, **options)
    model = onnx.load(str(out))
    emulated = ReferenceRunner(emulate_fp4(model).model)
    evaluator = ReferenceRunner(model)
    for x in [*batches(mlp), batches(mlp)[0][:1]]:
        np.testing.assert_array_equal(
            emulated.run(["y"], {"x": x})[0], evaluator.run(["y"], {"x": x})[0]
        )


def test_emulation_and_evaluator_agree_to_float_rounding(mlp, tmp_path):
    """Each Q -> DQ computes the same values (tests/graphs/test_fp4_emulation.py); between them
    ORT's Gemm/MatMul and Erf round differently from numpy's, so the outputs agree to float32
    rounding, but where such a difference moves a value across an E2M1 rounding boundary of
    the next layer (one grid step of that element)."""
    out = tmp_path / "q.onnx"
    calibrate_onnx(mlp / "mlp.onnx", mlp / "data", format="nvfp4", output=out, validate_batches=0)
    model = onnx.load(str(out))
    emulated, validator, note = fp4_runner(model, CPU)
    assert (validator, note) == (emulation_validator(CPU), None)
    evaluator = ReferenceRunner(model)
    for x in batches(mlp):
        (got,) = emulated.run(["y"], {"x": x})
        (want,) = evaluator.run(["y"], {"x": x})
        close = np.isclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        assert close.mean() >= 0.95
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.9999
    validation = validate_outputs(mlp / "mlp.onnx", model, CPU, open_data(mlp / "data"), 3)
    assert validation.validator == emulation_validator(CPU) and validation.default is None
    tally = ErrorTally(["y"])
    float_runner = ReferenceRunner(onnx.load(str(mlp / "mlp.onnx")))
    for x in batches(mlp):
        tally.add(float_runner.run(["y"], {"x": x}), evaluator.run(["y"], {"x": x}))
    want_error = tally.per_output()["y"]
    assert validation.reference["y"]["cosine"] == pytest.approx(want_error["cosine"], abs=1e-4)
    assert validation.reference["y"]["rel_l2"] == pytest.approx(want_error["rel_l2"], rel=0.05)


def test_the_tensorrt_form_validates_in_the_emulation(mlp, tmp_path):
    out = tmp_path / "q.onnx"
    options = {"format": "nvfp4", "nvfp4_form": "tensorrt"}
    result = calibrate_onnx(mlp / "mlp.onnx", mlp / "data", output=out, **options)
    assert result.report["validator"] == emulation_validator(CPU)
    written = onnx.load(str(out))
    assert any(node.domain == "trt" for node in written.graph.node)


def test_what_the_emulation_cannot_express_runs_in_the_evaluator_with_a_note(mlp, tmp_path):
    out = tmp_path / "q.onnx"
    calibrate_onnx(mlp / "mlp.onnx", mlp / "data", format="nvfp4", output=out, validate_batches=0)
    model = fp4_read_elsewhere(onnx.load(str(out)))
    validation = validate_outputs(mlp / "mlp.onnx", model, CPU, open_data(mlp / "data"), 1)
    assert validation.validator == EVALUATOR
    assert validation.to_report()["note"].startswith(
        "validated in the ONNX reference evaluator: the FP4 emulation cannot express "
        "QuantizeLinear node "
    )

"""The ONNX reference evaluator (FP4 models the FP4 emulation cannot express: here an FP4 tensor
that is also a graph output) validates within a time budget: past it, the batches
done so far make the validation and the report says so; with none done the run skips validation
with a note instead of running for as long as numpy takes, and still writes everything."""

from __future__ import annotations

import json

import onnx
import pytest
from mlp import make_mlp
from onnx import TensorProto, helper

from qcal_export.capture.data import open_data
from qcal_export.pipeline.calibrate import calibrate_onnx
from qcal_export.validation import fp4_runner
from qcal_export.validation.reference import ReferenceRunner
from qcal_export.validation.validate import EVALUATOR, ValidationSkipped, validate_outputs

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def nvfp4_model(tmp_path_factory):
    """(float model path, its NVFP4 QDQ model with FP4 codes as an output too, data directory)."""
    root = make_mlp(tmp_path_factory.mktemp("mlp"), seq=False)
    out = root / "q.onnx"
    calibrate_onnx(root / "mlp.onnx", root / "data", format="nvfp4", output=out, validate_batches=0)
    return root / "mlp.onnx", fp4_read_elsewhere(onnx.load(str(out))), root / "data"


def fp4_read_elsewhere(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its first FP4 activation's codes also a graph output: the emulation
    cannot replace them, so only the reference evaluator runs it."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    quantize = next(
        n
        for n in copy.graph.node
        if n.op_type == "QuantizeLinear"
        and any(a.name == "output_dtype" and a.i == TensorProto.FLOAT4E2M1 for a in n.attribute)
    )
    copy.graph.output.append(
        helper.make_tensor_value_info(quantize.output[0], TensorProto.FLOAT4E2M1, None)
    )
    return copy


def expire_after_first_run(monkeypatch):
    """Every ReferenceRunner's deadline passes once it has run one batch."""
    original = ReferenceRunner.run

    def run_then_expire(self, names, feed):
        outputs = original(self, names, feed)
        self._evaluator.deadline = 0.0
        return outputs

    monkeypatch.setattr(ReferenceRunner, "run", run_then_expire)


def test_a_budget_that_runs_out_keeps_the_batches_done(nvfp4_model, monkeypatch):
    float_path, model, data = nvfp4_model
    first = validate_outputs(float_path, model, CPU, open_data(data), 1)
    full = validate_outputs(float_path, model, CPU, open_data(data), 3, budget_s=600.0)
    assert (first.validator, first.batches, first.stopped) == (EVALUATOR, 1, None)
    assert full.batches == 3 and full.stopped is None
    expire_after_first_run(monkeypatch)
    stopped = validate_outputs(float_path, model, CPU, open_data(data), 3, budget_s=600.0)
    assert stopped.batches == 1
    assert stopped.stopped == (
        "validated on 1 of 3 batches: the ONNX reference evaluator's time budget (600 s) ran out"
    )
    assert stopped.reference == first.reference
    assert stopped.reference != full.reference


def test_no_batch_within_the_budget_skips_validation(nvfp4_model):
    float_path, model, data = nvfp4_model
    with pytest.raises(ValidationSkipped, match=r"^validation skipped: one batch took longer"):
        validate_outputs(float_path, model, CPU, open_data(data), 3, budget_s=0.0)


def test_the_run_writes_everything_and_notes_the_skipped_validation(
    nvfp4_model, tmp_path, monkeypatch
):
    float_path, _, data = nvfp4_model
    monkeypatch.setattr(ReferenceRunner, "run", _expired_run(ReferenceRunner.run))
    emulate = fp4_runner.emulate_fp4  # the run's model, as the emulation cannot express it
    monkeypatch.setattr(fp4_runner, "emulate_fp4", lambda m: emulate(fp4_read_elsewhere(m)))
    out, report = tmp_path / "q.onnx", tmp_path / "report.json"
    result = calibrate_onnx(float_path, data, format="nvfp4", output=out, report=report)
    saved = json.loads(report.read_text())
    assert saved["validation"] is None and result.report["validation"] is None
    assert any(n.startswith("validation skipped: one batch took") for n in saved["export_notes"])
    onnx.checker.check_model(str(out), full_check=True)


def _expired_run(original):
    def run(self, names, feed):
        self._evaluator.deadline = 0.0
        return original(self, names, feed)

    return run

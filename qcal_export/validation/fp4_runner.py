"""The runner of a model ONNX Runtime has no kernels for: ORT over the model's FP4 emulation
(graphs/fp4_emulation.py: the same values, at ORT's speed) where the emulation expresses the
whole model, else the ONNX reference evaluator, with a note saying why."""

from __future__ import annotations

import logging

import onnx
import onnxruntime as ort

from qcal_export.capture.onnxruntime import ORT_ERRORS, stored_session
from qcal_export.graphs.fp4_emulation import emulate_fp4
from qcal_export.validation.reference import EVALUATOR, ReferenceRunner
from qcal_export.validation.runtime_check import one_line

log = logging.getLogger(__name__)

EMULATION = "fp4 emulation"
"""What a validator's name says when ORT ran the FP4 emulation of the model."""


def emulation_validator(providers: list[str]) -> str:
    """The validator's name of ORT running a model's FP4 emulation on ``providers``."""
    return f"onnxruntime ({providers[0]}, {EMULATION})"


def fp4_runner(
    model: onnx.ModelProto, providers: list[str], deadline: float | None = None
) -> tuple[ort.InferenceSession | ReferenceRunner, str, str | None]:
    """A runner for ``model`` (FP4 tensors or TensorRT's ops, which ORT cannot run), the
    validator's name and a note where the reference evaluator runs it instead of the emulation.

    The emulation runs with ORT's graph optimizations off (its fusions of Q/DQ pairs could
    change the FP8 block scales); the evaluator stops past ``deadline`` (``ReferenceRunner``).
    """
    emulation = emulate_fp4(model)
    if emulation.unexpressed:
        listed = ", ".join(emulation.unexpressed[:3])
        more = len(emulation.unexpressed) - 3
        note = (
            f"validated in the ONNX reference evaluator: the FP4 emulation cannot express "
            f"{listed}{f' and {more} more' if more > 0 else ''}"
        )
    else:
        try:
            return _session(emulation.model, providers), emulation_validator(providers), None
        except ORT_ERRORS as e:
            note = (
                "validated in the ONNX reference evaluator: ONNX Runtime cannot run the FP4 "
                f"emulation: {one_line(e)}"
            )
    log.info("%s", note)
    return ReferenceRunner(model, deadline), EVALUATOR, note


def _session(model: onnx.ModelProto, providers: list[str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return stored_session(model, options, providers)

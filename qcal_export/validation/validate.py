"""Validate a QDQ model: onnx's full checker, then its outputs against the float model's, as
ONNX Runtime runs it by default and in a reference (ORT with graph optimizations off; for what
ORT cannot run, ORT over the model's FP4 emulation, or the ONNX reference evaluator)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from qcal_export.capture.data import DataSource, feeds, model_inputs
from qcal_export.capture.onnxruntime import ORT_ERRORS, open_session
from qcal_export.errors import ModelError
from qcal_export.validation.fp4_runner import fp4_runner
from qcal_export.validation.output_error import Errors, ErrorTally
from qcal_export.validation.reference import EVALUATOR as EVALUATOR
from qcal_export.validation.reference import (
    EvaluatorTimeout,
    ReferenceRunner,
    needs_reference_evaluator,
)
from qcal_export.validation.runtime_check import (
    Level,
    ModelSessions,
    RuntimeIssue,
    diagnose,
    one_line,
    worse_than_reference,
)

log = logging.getLogger(__name__)


def warn_nonfinite(errors: Errors, runner: str) -> None:
    """One warning per output whose elements were left out of the error for NaN or inf."""
    for name, error in errors.items():
        if error["nonfinite_quantized"]:
            log.warning(
                "output %r: %d elements are finite in the float model but NaN or inf in the "
                "quantized model (%s); the error leaves them out",
                name,
                error["nonfinite_quantized"],
                runner,
            )
        if error["nonfinite_float"]:
            log.warning(
                "output %r: %d elements are NaN or inf in the float model itself (the data?); "
                "the error leaves them out",
                name,
                error["nonfinite_float"],
            )


def float_outputs(session: ort.InferenceSession) -> list[str]:
    """The names of a session's float outputs, in order: what output errors compare."""
    return [o.name for o in session.get_outputs() if "float" in o.type]


def output_pairs(
    reference: ort.InferenceSession,
    candidate: ort.InferenceSession | ReferenceRunner,
    model: onnx.ModelProto,
    source: DataSource,
    max_batches: int | None = None,
) -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
    """Per batch (the first ``max_batches``, or all), both models' float outputs."""
    inputs = model_inputs(model)
    names = float_outputs(reference)
    for feed in feeds(source, inputs, max_batches):
        yield reference.run(names, feed), candidate.run(names, feed)


def reference_runner(
    model: onnx.ModelProto, providers: list[str]
) -> tuple[ort.InferenceSession | ReferenceRunner, str]:
    """A runner for the quantized model and the validator's name.

    ONNX Runtime where it has kernels for every op; for FLOAT4E2M1 tensors and TensorRT's FP4
    ops (ORT has no FP4 kernels) ORT over the model's FP4 emulation, and the ONNX reference
    evaluator for what the emulation cannot express (``fp4_runner``).
    """
    if needs_reference_evaluator(model):
        runner, validator, _ = fp4_runner(model, providers)
        return runner, validator
    return open_session(model, providers, "the quantized model"), f"onnxruntime ({providers[0]})"


@dataclass
class Validation:
    """The QDQ model's output error against the float model's, per graph output: in the
    reference (``validator``: ORT with graph optimizations off, or the ONNX reference evaluator)
    and as ORT runs it by default (``runtime``; ``default`` is None where ORT cannot run the
    model's types or failed: ``issue`` says how). ``stopped`` says why fewer batches than asked
    were validated (the reference evaluator's time budget), ``batches`` how many were."""

    reference: Errors
    validator: str
    default: Errors | None = None
    runtime: str | None = None
    issue: RuntimeIssue | None = None
    stopped: str | None = None
    batches: int | None = None
    note: str | None = None
    """Why the reference evaluator validated a model ORT cannot run, not its FP4 emulation."""

    @property
    def output_error(self) -> Errors:
        """What users get: the default session's error, else the reference's."""
        return self.reference if self.default is None else self.default

    @property
    def judged(self) -> Errors:
        """What the verdict judges: the reference's error where ORT's default session is at
        fault (the scales give that), else the error users get."""
        return self.reference if self.issue is not None else self.output_error

    @property
    def lowest_cosine(self) -> float:
        """The lowest output cosine of ``judged`` (1.0 with no output compared)."""
        return min((e["cosine"] for e in self.judged.values()), default=1.0)

    @property
    def output_validator(self) -> str:
        """The runner of ``output_error``."""
        return self.validator if self.default is None or self.runtime is None else self.runtime

    def to_report(self) -> dict[str, Any]:
        return {
            "validator": self.validator,
            "reference": self.reference,
            "runtime": self.runtime,
            "default": self.default,
            "runtime_issue": None if self.issue is None else self.issue.to_report(),
            "stopped": self.stopped,
            "note": self.note,
        }


def validate_outputs(
    float_model: Path,
    model: onnx.ModelProto,
    providers: list[str],
    source: DataSource,
    max_batches: int,
    name: str = "the quantized model",
    budget_s: float | None = None,
) -> Validation:
    """``model``'s outputs against ``float_model``'s on the first ``max_batches`` batches, in
    ORT at its default level and with optimizations off (one pass over the batches; the float
    model's outputs first, so that its session is closed before the quantized model's open).

    Where the default session fails, or lands further from the float model than the reference
    does beyond float noise (``runtime_check.worse_than_reference``), one warning says so and
    names the ORT optimizer at fault; a reference that cannot run is a ModelError naming
    ``name``. Models with types or ops ORT has no kernels for (FP4, TensorRT's) are validated
    alone, in ORT over their FP4 emulation or, for what it cannot express, in the ONNX reference
    evaluator for at most ``budget_s`` seconds (see ``_in_evaluator``).
    """
    float_session = open_session(float_model, providers, str(float_model))
    if needs_reference_evaluator(model):
        return _in_evaluator(float_session, model, providers, source, max_batches, budget_s)
    names = float_outputs(float_session)
    recorded = [
        (feed, float_session.run(names, feed))
        for feed in feeds(source, model_inputs(model), max_batches)
    ]
    del float_session  # one model's weights in memory at a time
    with ModelSessions(model, providers) as sessions:
        validation, first = _against_default(sessions, names, recorded, name)
        if validation.issue is not None:
            if first is not None:
                diagnose(sessions, *first, validation.issue)
            log.warning("%s", validation.issue.message)
    warn_nonfinite(validation.output_error, validation.output_validator)
    return validation


class ValidationSkipped(Exception):
    """No batch could be validated within the reference evaluator's time budget."""


def _in_evaluator(
    float_session: ort.InferenceSession,
    model: onnx.ModelProto,
    providers: list[str],
    source: DataSource,
    max_batches: int,
    budget_s: float | None,
) -> Validation:
    """The validation of a model ORT cannot run: in ORT over its FP4 emulation, or in the ONNX
    reference evaluator (``fp4_runner``), which runs numpy op by op, far slower than ORT: past
    ``budget_s`` it stops between two nodes and the batches done so far make the validation
    (``stopped`` says so); ValidationSkipped where not even one batch was done."""
    deadline = None if budget_s is None else time.monotonic() + budget_s
    runner, validator, note = fp4_runner(model, providers, deadline)
    tally = ErrorTally(float_outputs(float_session))
    stopped = None
    try:
        for refs, cands in output_pairs(float_session, runner, model, source, max_batches):
            tally.add(refs, cands)
    except EvaluatorTimeout:
        budget = f"the ONNX reference evaluator's time budget ({budget_s:.0f} s)"
        if tally.batches == 0:
            raise ValidationSkipped(
                f"validation skipped: one batch took longer than {budget}; validate the QDQ "
                "model on fewer or smaller batches (--validate-data), or deploy-test it"
            ) from None
        stopped = f"validated on {tally.batches} of {max_batches} batches: {budget} ran out"
        log.warning("%s", stopped)
    errors = tally.per_output()
    warn_nonfinite(errors, validator)
    return Validation(errors, validator, stopped=stopped, batches=tally.batches, note=note)


def _against_default(
    sessions: ModelSessions,
    names: list[str],
    recorded: list[tuple[dict[str, np.ndarray], list[np.ndarray]]],
    name: str,
) -> tuple[Validation, tuple | None]:
    """The validation without diagnosis on the ``recorded`` batches (feed, the float model's
    outputs ``names``), and the first batch (feed, output names, float and reference outputs)
    to diagnose on."""
    device = sessions.providers[0]
    reference, default, failure = _open_both(sessions, name)
    quantization, deployed = ErrorTally(names), ErrorTally(names)
    first = None
    for feed, floats in recorded:
        refs = _run_reference(reference, names, feed, name)
        first = first or (feed, names, floats, refs)
        quantization.add(floats, refs)
        if default is None:
            continue
        try:
            outs = default.run(names, feed)
        except ORT_ERRORS as e:
            default, failure = None, one_line(e)
            continue
        deployed.add(floats, outs)
    validator = f"onnxruntime ({device}, optimizations off)"
    validation = Validation(quantization.per_output(), validator)
    validation.runtime = f"onnxruntime ({device})"
    if failure is not None:
        validation.issue = RuntimeIssue("fails", validation.runtime, "", error=failure)
        return validation, first
    validation.default = deployed.per_output()
    off = [
        f"output {n!r} rel L2 {validation.default[n]['rel_l2']:.3g}, "
        f"{validation.reference[n]['rel_l2']:.3g} with optimizations off"
        for n in names
        if worse_than_reference(
            deployed.sums[n].diff_sq, quantization.sums[n].diff_sq, quantization.sums[n].cand_sq
        )
    ]
    if off:
        validation.issue = RuntimeIssue("disagrees", validation.runtime, "; ".join(off[:2]))
    return validation, first


def _run_reference(
    reference: ort.InferenceSession, names: list[str], feed: dict[str, np.ndarray], name: str
) -> list[np.ndarray]:
    """The quantized model's outputs with ORT's optimizations off: the reference every other
    run is judged against, so a failure is a ModelError naming ``name``."""
    try:
        return reference.run(names, feed)
    except ORT_ERRORS as e:
        raise ModelError(f"ONNX Runtime cannot run {name}: {one_line(e)}") from None


def _open_both(
    sessions: ModelSessions, name: str
) -> tuple[ort.InferenceSession, ort.InferenceSession | None, str | None]:
    """The reference session (ModelError naming ``name`` if it cannot load), and the default
    one or ORT's reason why it cannot load."""
    try:
        reference = sessions.open(Level.ORT_DISABLE_ALL)
    except ORT_ERRORS as e:
        raise ModelError(f"ONNX Runtime cannot load {name}: {one_line(e)}") from None
    try:
        return reference, sessions.open(), None
    except ORT_ERRORS as e:
        return reference, None, one_line(e)

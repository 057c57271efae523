"""The run's verdict: the quantized model's outputs against the float model's on the validation
batches, judged against a minimum cosine, with the user's task metric beside it.

Where ONNX Runtime's default optimizations miscompute or fail on the model (``Validation.issue``)
the verdict judges the reference (optimizations off), which is what the scales give, and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from qcal_export.capture.data import feeds, model_inputs
from qcal_export.capture.onnxruntime import open_session
from qcal_export.spec.checks import MIN_COSINE as MIN_COSINE
from qcal_export.spec.checks import check_min_cosine as check_min_cosine
from qcal_export.validation.data import ValidationData
from qcal_export.validation.eval_module import Metric, Outputs, batch_size, evaluate
from qcal_export.validation.fp4_runner import fp4_runner
from qcal_export.validation.reference import ReferenceRunner, needs_reference_evaluator
from qcal_export.validation.runtime_check import Level, ModelSessions
from qcal_export.validation.validate import Validation

log = logging.getLogger(__name__)


def judge(
    validation: Validation,
    data: ValidationData,
    min_cosine: float,
    metric: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report's ``verdict``: the lowest output cosine against ``min_cosine`` (and no value
    NaN or inf that the float model gives finite), on the batches ``data`` describes."""
    judged_reference = validation.issue is not None
    errors = validation.judged
    verdict: dict[str, Any] = {
        "status": "none",
        "min_cosine": min_cosine,
        "judged": validation.validator if judged_reference else validation.output_validator,
        "batches": data.describe(),
        "held_out": data.held_out,
        "line": f"verdict: none (no float output to compare, on {_batches(data)})",
    }
    if not errors:
        return verdict
    worst = min(errors, key=lambda name: errors[name]["cosine"])
    cosine = errors[worst]["cosine"]
    nonfinite = sum(e["nonfinite_quantized"] for e in errors.values())
    passed = cosine >= min_cosine and not nonfinite
    output = f"output {worst!r}" if len(errors) == 1 else f"lowest of {len(errors)}: {worst!r}"
    figure = f"{output} cosine {cosine:.4f} {'>=' if cosine >= min_cosine else '<'} {min_cosine:g}"
    if nonfinite:
        figure += f", {nonfinite} values NaN or inf where the float model's are finite"
    line = f"verdict: {'PASS' if passed else 'BELOW TARGET'} ({figure} on {_batches(data)}"
    line += (_runtime_clause(validation, worst) if judged_reference else "") + ")"
    if metric:
        line += "; " + ", ".join(f"{k} {v:.4g}" for k, v in metric["values"].items())
    verdict.update(
        status="pass" if passed else "below target",
        output=worst,
        cosine=cosine,
        cosines={name: e["cosine"] for name, e in errors.items()},
        line=line,
    )
    return verdict


def _runtime_clause(validation: Validation, output: str) -> str:
    """Where ORT's default optimizations are at fault: that the figure is the reference's, and
    what ORT at its default level gives instead."""
    assert validation.issue is not None
    default = validation.default
    got = f": cosine {default[output]['cosine']:.4f} there" if default else ""
    return (
        f", ORT's optimizations off; {validation.issue.summary}"
        f"{got}: the runtime is at fault, not the quantization"
    )


def task_metric(
    float_model: Path,
    model: onnx.ModelProto,
    providers: list[str],
    data: ValidationData,
    max_batches: int,
    metric: Metric,
    *,
    reference: bool,
) -> dict[str, Any]:
    """The report's ``metric``: ``metric`` averaged over the validation batches, the quantized
    model run as the verdict judges it (``reference``: ORT's optimizations off)."""
    float_session = open_session(float_model, providers, str(float_model))
    inputs = model_inputs(model)
    if needs_reference_evaluator(model):
        runner = fp4_runner(model, providers)[0]
        values = evaluate(metric, _pairs(float_session, runner, data, inputs, max_batches))
    else:
        with ModelSessions(model, providers) as sessions:
            session = sessions.open(Level.ORT_DISABLE_ALL if reference else None)
            values = evaluate(metric, _pairs(float_session, session, data, inputs, max_batches))
    return {"function": metric.name, "values": values, "batches": data.describe()}


def _pairs(
    float_session: ort.InferenceSession,
    quantized: ort.InferenceSession | ReferenceRunner,
    data: ValidationData,
    inputs: list,
    max_batches: int,
) -> Iterator[tuple[Outputs, Outputs, int]]:
    """Per validation batch: both models' outputs by name, and the batch size."""
    names = [o.name for o in float_session.get_outputs()]
    assert data.source is not None
    for feed in feeds(data.source, inputs, max_batches):
        floats = dict(zip(names, float_session.run(names, feed), strict=True))
        quants = dict(zip(names, quantized.run(names, feed), strict=True))
        yield floats, quants, batch_size(feed)


def _batches(data: ValidationData) -> str:
    seen = len(set(data.seen))
    count = f"{seen} batch{'es' if seen != 1 else ''}"
    if data.kind == "held out":
        return f"{count} held out from calibration"
    if data.kind == "validate-data":
        return f"{count} of --validate-data"
    if data.kind == "scales-in":
        return f"{count} of the data"
    if data.kind == "uncalibrated":
        return f"{count} of the data, no activation calibrated on it"
    return f"the {count} calibrated on (too few to hold out)"


@dataclass(frozen=True)
class Checks:
    """How a run judges its QDQ model: on ``data`` (None: not validated), against
    ``min_cosine``, with the user's ``metric`` beside the cosine."""

    data: ValidationData | None
    min_cosine: float = MIN_COSINE
    metric: Metric | None = None


def measure(
    float_model: Path,
    model: onnx.ModelProto,
    providers: list[str],
    validation: Validation,
    checks: Checks,
    max_batches: int,
) -> dict[str, Any] | None:
    """The report's ``metric`` where ``checks`` has one (None otherwise), on the quantized model
    as the verdict judges it: before anything is written, so that a fault in it writes nothing."""
    if checks.metric is None or checks.data is None:
        return None
    reference = validation.issue is not None or validation.default is None
    return task_metric(
        float_model, model, providers, checks.data, max_batches, checks.metric, reference=reference
    )


def conclude(
    report: dict[str, Any], validation: Validation, checks: Checks, metric: dict[str, Any] | None
) -> dict[str, Any]:
    """Add to ``report`` the validation batches, the task ``metric`` and the verdict (a warning
    when below target); returns the verdict."""
    assert checks.data is not None
    report["validation"].update(batches=checks.data.describe(), held_out=checks.data.held_out)
    if metric is not None:
        report["metric"] = metric
    verdict = judge(validation, checks.data, checks.min_cosine, metric)
    report["verdict"] = verdict
    if verdict["status"] == "below target":
        log.warning("%s", verdict["line"])
    return verdict

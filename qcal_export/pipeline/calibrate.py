"""One calibration run: plan -> capture -> calibrate -> export, as ``calibrate_onnx``."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import onnx

from qcal_export.analysis.accuracy import Accuracy, split_data, target_from
from qcal_export.analysis.layer_view import Analysis
from qcal_export.analysis.mixed_formats import MixedAnalysis
from qcal_export.artifacts.calib_table import write_calib_table
from qcal_export.artifacts.html_report import write_html
from qcal_export.artifacts.onnx_layers import write_checkpoints
from qcal_export.artifacts.report import save_report
from qcal_export.artifacts.scales import save_scales
from qcal_export.calibrate.distributed import ranks_from_env
from qcal_export.calibrate.tensor import relative_weight_errors
from qcal_export.capture.data import DataSource, feeds, model_inputs
from qcal_export.capture.forms import DataOptions
from qcal_export.errors import BelowTargetError, RecipeError, RuntimeMismatchError
from qcal_export.graphs.export import ExportResult, export_qdq
from qcal_export.onnx_io.model_io import save_model
from qcal_export.pipeline.fallback import fall_back, fallback_source
from qcal_export.pipeline.mixed_step import calibrate_levels, mixed_config, plan_levels
from qcal_export.pipeline.report import build_report
from qcal_export.pipeline.run import (
    CalibrationResult,
    Outputs,
    Run,
    asked_outputs,
    check_request,
    plan_run,
    shard_run,
    state_file,
)
from qcal_export.pipeline.scales_step import ProgressFactory, calibrate_scales, weight_device
from qcal_export.pipeline.steps import prepare, refine
from qcal_export.spec.config import CalibrationConfig
from qcal_export.spec.plan import Plan
from qcal_export.spec.recipe import Recipe
from qcal_export.spec.scales import TensorScales
from qcal_export.validation.data import ValidationData
from qcal_export.validation.deployment import measure_deployment
from qcal_export.validation.eval_module import Metric, load_metric
from qcal_export.validation.reference import needs_reference_evaluator
from qcal_export.validation.validate import Validation, ValidationSkipped, validate_outputs
from qcal_export.validation.verdict import Checks, conclude, measure

log = logging.getLogger(__name__)

MIN_EVALUATOR_BUDGET_S = 60.0
"""The least time the ONNX reference evaluator gets to validate (FP4 and TensorRT-op models);
past the calibration's own time, if longer, it stops: see ``validate._in_evaluator``."""


def calibrate_onnx(
    model: str | Path,
    data: Any = None,
    config: CalibrationConfig | None = None,
    *,
    data_options: DataOptions | None = None,
    progress: ProgressFactory | None = None,
    **options: Any,
) -> CalibrationResult:
    """Calibrate ``model`` on ``data`` and write the QDQ model, scales and report asked for.

    ``config``: a CalibrationConfig (spec/config.py: its groups say what each option does);
    keyword ``options`` build one, or change the one given (``format="fp8"``,
    ``output="q.onnx"``, ``state_every=10``, ...; an unknown keyword is a RecipeError).
    ``data``: a .npz file, a directory of .npz/.npy, an iterable of {input: array} dicts or an
    ORT CalibrationDataReader; also a directory of images or .txt files, a text file,
    ``"random"`` or a DataModule (``file.py:function``); ``data_options`` (ImageOptions,
    TextOptions, RandomOptions) say how images, texts or random data become the model's inputs.
    ``progress``: given a label, a context manager yielding a callback called once per batch.
    With saved scales (``scales_in``) ``data`` only serves validation. A state file
    (``state``) is saved every ``state_every`` batches; with ``resume`` a run continues from it
    (same model, recipe and data order) and gives the scales of an uninterrupted run.
    Validation runs the QDQ model in ONNX Runtime at its default optimizations and with them off
    (the reference) on ``validate_batches`` held-out batches; the report's ``verdict`` judges
    the lowest output cosine against ``min_cosine``; models ORT cannot run (FP4, TensorRT's ops)
    are validated in the ONNX reference evaluator for at most the calibration's time
    (``MIN_EVALUATOR_BUDGET_S`` at least), on the batches done by then, or not at all with a
    note in ``export_notes``; under ``strict`` a runtime mismatch raises
    RuntimeMismatchError, a verdict below target BelowTargetError, once everything is written.
    No input (the model, its external data, the data, ``scales_in``, the recipe file) is ever
    written: an output on one of them, or on another output, is refused before anything runs.
    """
    config, format_recipes = mixed_config(_config(config, options))
    recipe = config.quantization.build()
    metric = _metric(config.validation.eval_module)
    accuracy = _accuracy(config, format_recipes)
    run = plan_run(
        model, recipe, data, config.data.batch_size, config.capture.provider, data_options
    )
    try:  # the model's weight store is released when the run ends, however it ends
        return _calibrate(run, config, data, data_options, progress, metric, accuracy)
    finally:
        run.loaded.store.release()


def _calibrate(
    run: Run,
    config: CalibrationConfig,
    data: Any,
    data_options: DataOptions | None,
    progress: ProgressFactory | None,
    metric: Metric | None,
    accuracy: Accuracy,
) -> CalibrationResult:
    """The planned run's steps: check what is asked, split the data, calibrate, refine, write."""
    run.plan.notes += config.quantization.notes()
    asked = asked_outputs(config)
    keep = check_request(run, asked, config, data, data_options)
    split = split_data(
        run.source,
        accuracy,
        validate=config.validation.validate_batches,
        validate_data=config.validation.validate_data,
        batch_size=config.data.batch_size,
        scales_in=config.quantization.scales_in,
    )
    run.source = split.calibration
    checks = Checks(split.validation, float(config.validation.min_cosine), metric)
    outputs = _join_ranks(run, dataclasses.replace(asked, keep=keep), accuracy, config)
    holdout = split.holdout
    sections = prepare(run, accuracy, config.data.max_batches, config.quantization.scales_in)
    recipes = list(accuracy.format_recipes)
    plans = plan_levels(run, accuracy.formats, recipes) if recipes else []
    run.state = state_file(run, config, split.split)
    with run.timed("calibrate_s"):
        found = calibrate_scales(run, config, progress)
        levels = calibrate_levels(run, config, progress, recipes, plans, found) if plans else None
    found, analysis = refine(run, found, accuracy, holdout, sections, levels)
    run.weight_errors = relative_weight_errors(run.loaded.proto, found.values(), weight_device(run))
    return _write_outputs(run, found, outputs, sections, analysis, holdout, checks)


def _config(config: CalibrationConfig | None, options: dict[str, Any]) -> CalibrationConfig:
    """The config given, changed by keyword ``options``, or one built from them."""
    if config is None:
        return CalibrationConfig.from_options(**options)
    if not isinstance(config, CalibrationConfig):
        raise RecipeError(f"config must be a CalibrationConfig, not {type(config).__name__}")
    return config.replace(**options) if options else config


def _metric(eval_module: str | None) -> Metric | None:
    """The user's task metric (``eval_module``), loaded before anything runs."""
    return load_metric(eval_module) if eval_module is not None else None


def _accuracy(config: CalibrationConfig, format_recipes: list[Recipe]) -> Accuracy:
    """The accuracy steps the config asks for (its options were checked when it was built),
    with each listed format's recipe for a mixed-format search."""
    wanted = config.accuracy
    target = target_from(wanted.target_cosine, wanted.target_rel_l2)
    accuracy = Accuracy(
        wanted.layer_view,
        target,
        wanted.holdout_every,
        wanted.view_batches,
        wanted.smooth,
        wanted.auto_samples,
        wanted.formats or (),
        tuple(format_recipes),
    )
    accuracy.check(config.quantization.scales_in)
    return accuracy


def _join_ranks(
    run: Run, outputs: Outputs, accuracy: Accuracy, config: CalibrationConfig
) -> Outputs:
    """Place this process: on the config's ``device_id``, or, one of several that torchrun
    started, on its share of the data (and its GPU); the outputs it writes (none but the
    writing rank's)."""
    run.device_id = config.capture.device_id
    run.ranks = ranks_from_env(cuda="CUDAExecutionProvider" in run.providers)
    if run.ranks.world > 1:
        shard_run(run, accuracy.one_process, config.state.state, config.state.resume)
        if not run.ranks.writes:
            return dataclasses.replace(
                outputs,
                model=None,
                scales=None,
                report=None,
                html=None,
                checkpoint=None,
                calib_table=None,
                validate_batches=0,
            )
    return outputs


def _write_outputs(
    run: Run,
    found: dict[str, TensorScales],
    outputs: Outputs,
    sections: dict[str, Any],
    analysis: Analysis | MixedAnalysis | None,
    holdout: DataSource | None,
    checks: Checks,
) -> CalibrationResult:
    """Export and validate the QDQ model (on ``checks.data``), write the files asked for and
    build the report (with ``sections``, ``analysis`` on the ``holdout`` batches, and the
    verdict); under ``outputs.strict`` a runtime mismatch or a verdict below target raises once
    everything is written."""
    result = CalibrationResult(scales=found, report={}, timings=run.timings)
    exported, validation = _export(run, found, outputs, result, checks.data, checks.min_cosine)
    metric = None
    if validation is not None:
        with run.timed("metric_s"):
            metric = measure(
                run.loaded.path,
                exported.model,
                run.providers,
                validation,
                checks,
                outputs.validate_batches,
            )
    _write_files(run, found, outputs, exported, result)
    result.report = {**build_report(run, found, exported, validation, result), **sections}
    if _runs_in_ort(exported.model, validation):
        with run.timed("deployment_s"):
            feed = next(feeds(run.source, model_inputs(exported.model), 1))
            result.report["deployment"] = measure_deployment(
                run.loaded.path, exported.model, result.model_path, feed, run.providers
            )
    verdict = None
    if validation is not None:
        verdict = conclude(result.report, validation, checks, metric)
    if analysis is not None:
        with run.timed("heldout_s"):
            result.report.update(analysis.report(run.planned(), exported.model, holdout))
    if outputs.report is not None:
        result.report_path = save_report(outputs.report, result.report)
    if outputs.html is not None:
        result.html_path = write_html(outputs.html, result.report)
    if outputs.strict:
        _refuse_strictly(result, validation, verdict)
    return result


def _write_files(
    run: Run,
    found: dict[str, TensorScales],
    outputs: Outputs,
    exported: ExportResult,
    result: CalibrationResult,
) -> None:
    """Write the calibration table, the QDQ model and the scales file asked for (the report
    follows, naming them)."""
    if outputs.calib_table is not None:
        result.calib_table_path = write_calib_table(
            outputs.calib_table, run.plan, found, outputs.calib_table_form, outputs.trt_version
        )
    if outputs.model is not None:
        result.model_path = save_model(
            exported.model, outputs.model, external_data=run.loaded.external_data, keep=outputs.keep
        )
    if outputs.scales is not None:
        result.scales_path = save_scales(outputs.scales, found, run.loaded.sha256)


def _refuse_strictly(
    result: CalibrationResult, validation: Validation | None, verdict: dict[str, Any] | None
) -> None:
    """Under ``strict``: RuntimeMismatchError where ORT's default session is at fault,
    BelowTargetError where the verdict is below target (both exit 3; everything is written)."""
    paths = (
        result.model_path,
        result.scales_path,
        result.calib_table_path,
        result.report_path,
        result.html_path,
    )
    written = ", ".join(str(p) for p in paths if p) or "nothing asked"
    if validation is not None and validation.issue is not None:
        raise RuntimeMismatchError(f"--strict: {validation.issue.summary}; written: {written}")
    if verdict is not None and verdict["status"] == "below target":
        raise BelowTargetError(f"--strict: {verdict['line']}; written: {written}")


def _runs_in_ort(model: onnx.ModelProto, validation: Validation | None) -> bool:
    """Whether the deployment section can be measured: the model was validated and ORT runs
    it at its default optimizations (no FLOAT4E2M1 or TensorRT op; no failure found)."""
    if validation is None or needs_reference_evaluator(model):
        return False
    return validation.issue is None or validation.issue.kind != "fails"


def _export(
    run: Run,
    found: dict[str, TensorScales],
    outputs: Outputs,
    result: CalibrationResult,
    data: ValidationData | None,
    min_cosine: float,
) -> tuple[ExportResult, Validation | None]:
    """The serving checkpoints asked for (their paths into ``result``), then the QDQ model and
    its validation on ``data`` (None when there is no data or no batch to validate on); below
    ``min_cosine``, the model with only the compute ops quantized where it does better
    (``fallback.fall_back``)."""
    if outputs.checkpoint is not None:
        with run.timed("checkpoint_s"):
            result.checkpoint_paths = write_checkpoints(
                run.loaded.proto, run.plan, found, outputs.checkpoint, outputs.checkpoint_layouts
            )
    validates = data is not None and outputs.validate_batches > 0
    source = fallback_source(run.plan, run.loaded.proto) if validates else None

    def export(plan: Plan, model: onnx.ModelProto) -> ExportResult:
        recipe, layout = run.recipe, outputs.int4_layout
        return export_qdq(model, plan, found, recipe.weights_mode, recipe.nvfp4_form, layout)

    with run.timed("export_s"):
        exported = export(run.plan, run.loaded.proto)
    if data is None or not validates:
        return exported, None
    with run.timed("validate_s"):
        try:
            validation = _output_error(run, exported.model, outputs.validate_batches, data)
        except ValidationSkipped as e:
            log.warning("%s", e)
            exported.notes.append(str(e))
            return exported, None
        if source is not None:
            narrow, spare = source
            run.plan, exported, validation = fall_back(
                run.plan,
                narrow,
                (exported, validation),
                lambda plan: export(plan, spare),
                lambda model: _output_error(run, model, outputs.validate_batches, data),
                min_cosine,
            )
    if not run.batches_per_pass and data.kind == "calibration":
        data.kind = "uncalibrated"  # too few to hold out, but no pass calibrated on them
    return exported, validation


def _output_error(
    run: Run, exported: onnx.ModelProto, max_batches: int, data: ValidationData
) -> Validation:
    """Error of the QDQ model's outputs against the float model's, on the first batches of
    ``data`` (their indices recorded there): in ONNX
    Runtime as users run it (default optimizations) and in a reference (optimizations off; for
    FP4, ORT over the model's FP4 emulation, or the ONNX reference evaluator for what it cannot
    express); ``run.validator`` names the runner of the error users get."""
    name = f"the quantized model of {run.loaded.path}"
    seen = len(data.seen)
    budget = max(MIN_EVALUATOR_BUDGET_S, run.timings.get("calibrate_s", 0.0))
    validation = validate_outputs(
        run.loaded.path,
        exported,
        run.providers,
        data.recorded(max_batches),
        max_batches,
        name,
        budget_s=budget,
    )
    if validation.batches is not None:  # a pass stopped early: the batch cut short was not used
        del data.seen[seen + validation.batches :]
    run.validator = validation.output_validator
    return validation

"""One calibration run: plan -> capture -> calibrate -> export, as ``calibrate_onnx``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from qcal_export.analysis.accuracy import Accuracy, prepare, refine, split_data, target_from
from qcal_export.analysis.layer_view import Analysis
from qcal_export.artifacts.onnx_layers import write_checkpoints
from qcal_export.artifacts.report import save_report
from qcal_export.artifacts.scales import load_scales, save_scales
from qcal_export.calibrate.activations import calibrate_activations, hessian_inputs
from qcal_export.calibrate.distributed import ranks_from_env
from qcal_export.calibrate.resume import StateFile
from qcal_export.calibrate.tensor import Collector, calibrate_weights, relative_weight_errors
from qcal_export.capture.data import DataSource, check_count, feeds, model_inputs
from qcal_export.capture.forms import DataOptions
from qcal_export.capture.onnxruntime import OrtCapture
from qcal_export.errors import BelowTargetError, DataError, RecipeError, RuntimeMismatchError
from qcal_export.graphs.export import ExportResult, check_scales_match, export_qdq
from qcal_export.onnx_io.model_io import save_model
from qcal_export.onnx_io.tensor_types import tensor_types
from qcal_export.pipeline.report import build_report
from qcal_export.pipeline.run import (
    Outputs,
    Run,
    check_request,
    plan_run,
    shard_run,
    state_identity,
)
from qcal_export.spec.recipe import Recipe, load_recipe
from qcal_export.spec.recipe_options import recipe_from_options, recipe_notes
from qcal_export.spec.scales import TensorScales
from qcal_export.validation.data import ValidationData
from qcal_export.validation.deployment import measure_deployment
from qcal_export.validation.eval_module import load_metric
from qcal_export.validation.reference import needs_reference_evaluator
from qcal_export.validation.validate import Validation, validate_outputs
from qcal_export.validation.verdict import MIN_COSINE, Checks, check_min_cosine, conclude, measure

log = logging.getLogger(__name__)

ProgressFactory = Callable[[str], AbstractContextManager[Callable[[], None]]]
"""Given a label, a context manager yielding a callback called once per batch."""


@dataclass
class CalibrationResult:
    """Scales per tensor, the report (a JSON-able dict) and the paths written."""

    scales: dict[str, TensorScales]
    report: dict[str, Any]
    model_path: Path | None = None
    scales_path: Path | None = None
    report_path: Path | None = None
    checkpoint_paths: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def calibrate_onnx(
    model: str | Path,
    data: Any = None,
    *,
    output: str | Path | None = None,
    scales: str | Path | None = None,
    report: str | Path | None = None,
    recipe: Recipe | str | Path | None = None,
    batch_size: int | None = None,
    max_batches: int | None = None,
    provider: str = "auto",
    device_id: int = 0,
    scales_in: str | Path | None = None,
    validate_batches: int = 4,
    validate_data: Any = None,
    min_cosine: float = MIN_COSINE,
    eval_module: str | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_layouts: tuple[str, ...] = ("modelopt",),
    progress: ProgressFactory | None = None,
    state: str | Path | None = None,
    state_every: int = 100,
    resume: bool = False,
    layer_view: bool = False,
    target_cosine: float | None = None,
    target_rel_l2: float | None = None,
    holdout_every: int = 5,
    view_batches: int = 4,
    smooth: float | None = None,
    strict: bool = False,
    data_options: DataOptions | None = None,
    **options: Any,
) -> CalibrationResult:
    """Calibrate ``model`` on ``data`` and write the QDQ model, scales and report asked for.

    ``data``: a .npz file, a directory of .npz/.npy, an iterable of {input: array} dicts or an
    ORT CalibrationDataReader. ``recipe``: a Recipe, or a YAML/JSON recipe file to load. With
    ``scales_in`` the scales come from that file instead (``data`` then only serves
    validation). ``options`` build the recipe when none is given (``format``, ``method``,
    ``weight_method``, ``block_size``, ...: see ``recipe_options.build_recipe``).
    ``data`` may also be a directory of images or .txt files, a text file, ``"random"`` or a
    DataModule (``file.py:function``); ``data_options`` (ImageOptions, TextOptions,
    RandomOptions) say how images, texts or random data become the model's inputs.
    ``device_id``: the GPU that captures under the CUDA EP (activations stay on it).
    ``checkpoint``: a directory for NVFP4 serving checkpoints, one subdirectory per layout.
    ``state``: a file where calibrator state is saved every ``state_every`` batches; with
    ``resume`` a run continues from it (same model, recipe and data order) and gives the scales
    of an uninterrupted run. It is removed when calibration completes.
    ``layer_view``: the report gets each quantized node's SQNR and sensitivity (on the first
    ``view_batches`` calibration batches, which also serve ``method="auto"``: per activation,
    the method nearest float by the graph outputs with only its consumers quantized).
    ``target_cosine`` / ``target_rel_l2``: leave the fewest nodes in float so that held-out
    batches (every ``holdout_every``-th batch, never calibrated on) meet that output error;
    implies ``layer_view``. ``smooth``: migrate activation outliers into the weights (SmoothQuant,
    this alpha) before calibrating.
    Validation runs the QDQ model in ONNX Runtime at its default optimizations and with them off
    (the reference) on ``validate_batches`` batches never calibrated on: of ``validate_data``
    where given, else every ``holdout_every``-th batch of the data, held out (with fewer batches
    than that, the calibration batches, and the report says so). Where the default fails or
    disagrees, a warning names the ORT optimizer at fault and the report's ``validation`` section
    records it. The report's ``verdict`` judges the lowest output cosine against ``min_cosine``
    (a warning when below); ``eval_module`` ("file.py:function", see ``eval_module``) adds a task
    metric beside it. ``strict``: a runtime mismatch raises RuntimeMismatchError, a verdict below
    target BelowTargetError (CLI exit code 3 both), once the outputs and the report are written.
    No input (the model, its external data, the data, ``scales_in``, the recipe file) is ever
    written: an output on one of them, or on another output, is refused before anything runs.
    """
    recipe_file = recipe if isinstance(recipe, (str, Path)) else None
    given = load_recipe(recipe_file) if recipe_file else recipe
    recipe = recipe_from_options(given, options)
    check_count("max_batches (--batches)", max_batches, 1, optional=True)
    check_count("validate_batches (--validate-batches)", validate_batches, 0)
    min_cosine = check_min_cosine(min_cosine)
    metric = load_metric(eval_module) if eval_module is not None else None
    accuracy = Accuracy(
        layer_view, target_from(target_cosine, target_rel_l2), holdout_every, view_batches, smooth
    )
    accuracy.check(scales_in)
    run = plan_run(model, recipe, data, batch_size, provider, data_options)
    run.plan.notes += recipe_notes(given, options)
    asked = Outputs(
        output, scales, report, checkpoint, checkpoint_layouts, validate_batches, strict
    )
    keep = check_request(
        run,
        asked,
        data=data,
        data_options=data_options,
        validate_data=validate_data,
        recipe=recipe_file,
        scales_in=scales_in,
        state=state,
    )
    split = split_data(
        run,
        accuracy,
        validate=validate_batches,
        validate_data=validate_data,
        batch_size=batch_size,
        scales_in=scales_in,
    )
    checks = Checks(split.validation, min_cosine, metric)
    outputs = _join_ranks(
        run, dataclasses.replace(asked, keep=keep), accuracy, device_id, state, resume
    )
    holdout, sections = split.holdout, prepare(run, accuracy, max_batches)
    if state is not None:
        identity = state_identity(run, max_batches, batch_size)
        identity.update(smooth=smooth, holdout_every=holdout_every if split.split else None)
        run.state = StateFile(state, identity, every=state_every)
    elif resume:
        raise RecipeError("resume needs the state file to resume from: pass state=PATH (--state)")
    with run.timed("calibrate_s"):
        found = _scales(run, scales_in, max_batches, progress, resume)
    found, analysis = refine(run, found, accuracy, holdout, sections)
    run.weight_errors = relative_weight_errors(run.loaded.proto, found.values())
    return _write_outputs(run, found, outputs, sections, analysis, holdout, checks)


def _join_ranks(
    run: Run,
    outputs: Outputs,
    accuracy: Accuracy,
    device_id: int,
    state: str | Path | None,
    resume: bool,
) -> Outputs:
    """Place this process: on ``device_id``, or, one of several that torchrun started, on its
    share of the data (and its GPU); the outputs it writes (none but the writing rank's)."""
    run.device_id = device_id
    run.ranks = ranks_from_env(cuda="CUDAExecutionProvider" in run.providers)
    if run.ranks.world > 1:
        shard_run(run, accuracy.one_process, state, resume)
        if not run.ranks.writes:
            return dataclasses.replace(
                outputs, model=None, scales=None, report=None, checkpoint=None, validate_batches=0
            )
    return outputs


def _write_outputs(
    run: Run,
    found: dict[str, TensorScales],
    outputs: Outputs,
    sections: dict[str, Any],
    analysis: Analysis | None,
    holdout: DataSource | None,
    checks: Checks,
) -> CalibrationResult:
    """Export and validate the QDQ model (on ``checks.data``), write the files asked for and
    build the report (with ``sections``, ``analysis`` on the ``holdout`` batches, and the
    verdict); under ``outputs.strict`` a runtime mismatch or a verdict below target raises once
    everything is written."""
    result = CalibrationResult(scales=found, report={}, timings=run.timings)
    exported, validation = _export(run, found, outputs, result, checks.data)
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
    if outputs.model is not None:
        result.model_path = save_model(
            exported.model, outputs.model, external_data=run.loaded.external_data, keep=outputs.keep
        )
    if outputs.scales is not None:
        result.scales_path = save_scales(outputs.scales, found, run.loaded.sha256)
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
            result.report.update(analysis.report(run, exported.model, holdout))
    if outputs.report is not None:
        result.report_path = save_report(outputs.report, result.report)
    if outputs.strict:
        _refuse_strictly(result, validation, verdict)
    return result


def _refuse_strictly(
    result: CalibrationResult, validation: Validation | None, verdict: dict[str, Any] | None
) -> None:
    """Under ``strict``: RuntimeMismatchError where ORT's default session is at fault,
    BelowTargetError where the verdict is below target (both exit 3; everything is written)."""
    paths = (result.model_path, result.scales_path, result.report_path)
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
) -> tuple[ExportResult, Validation | None]:
    """The serving checkpoints asked for (their paths into ``result``), then the QDQ model and
    its validation on ``data`` (None when there is no data or no batch to validate on)."""
    if outputs.checkpoint is not None:
        with run.timed("checkpoint_s"):
            result.checkpoint_paths = write_checkpoints(
                run.loaded.proto, run.plan, found, outputs.checkpoint, outputs.checkpoint_layouts
            )
    with run.timed("export_s"):
        exported = export_qdq(
            run.loaded.proto, run.plan, found, run.recipe.weights_mode, run.recipe.nvfp4_form
        )
    validation = None
    if data is not None and outputs.validate_batches > 0:
        with run.timed("validate_s"):
            validation = _output_error(run, exported.model, outputs.validate_batches, data)
    return exported, validation


def _scales(
    run: Run,
    scales_in: str | Path | None,
    max_batches: int | None,
    progress: ProgressFactory | None,
    resume: bool,
) -> dict[str, TensorScales]:
    """Scales for every planned tensor: read from ``scales_in`` or calibrated now."""
    if scales_in is not None:
        found, header = load_scales(scales_in)
        check_scales_match(run.plan, found, str(scales_in))
        if header.get("model_sha256") != run.loaded.sha256:
            log.warning(
                "%s was calibrated on another model file than %s", scales_in, run.loaded.path
            )
        return found
    hessians = hessian_inputs(run.plan)
    if run.source is None and (run.plan.activations or hessians):
        raise DataError("calibration needs data: pass --data (or scales_in to reuse saved scales)")
    found: dict[str, TensorScales] = {}
    capture = _capture_pass(run, max_batches, progress)
    activations = calibrate_activations(
        run.plan, capture, run.recipe.nonfinite, state=run.state, resume=resume, ranks=run.ranks
    )
    run.batches_per_pass = activations.batches_per_pass
    found.update(
        calibrate_weights(run.loaded.proto, run.plan, run.recipe.nonfinite, activations.hessians)
    )
    found.update(activations.scales)
    run.candidates = activations.candidates
    return found


def _capture_pass(run: Run, max_batches: int | None, progress: ProgressFactory | None):
    """A CapturePass over the run's data with one ORT session, opened on first use."""
    sessions: list[OrtCapture] = []

    def capture(
        collectors: dict[str, list[Collector]],
        label: str,
        *,
        skip: int = 0,
        after_batch: Callable[[int], None] | None = None,
    ) -> int:
        if not sessions:
            types = tensor_types(run.loaded.proto)
            wanted = {t: types[t] for t in [*run.plan.activations, *hessian_inputs(run.plan)]}
            sessions.append(
                OrtCapture(
                    run.loaded.proto,
                    wanted,
                    providers=run.providers,
                    name=str(run.loaded.path),
                    device_id=run.device_id,
                )
            )

        def sink(tensor: str, value: torch.Tensor) -> None:
            for collect in collectors[tensor]:
                collect(value)

        with progress(f"calibrating ({label})") if progress else nullcontext() as on_batch:
            return sessions[0].run(
                run.source,
                sink,
                tensors=list(collectors),
                max_batches=max_batches,
                on_batch=on_batch,
                skip=skip,
                after_batch=after_batch,
                allow_empty=run.ranks.world > 1,
            )

    return capture


def _output_error(
    run: Run, exported: onnx.ModelProto, max_batches: int, data: ValidationData
) -> Validation:
    """Error of the QDQ model's outputs against the float model's, on the first batches of
    ``data`` (their indices recorded there): in ONNX
    Runtime as users run it (default optimizations) and in a reference (optimizations off; the
    ONNX reference evaluator for FLOAT4E2M1 and TensorRT's ops); ``run.validator`` names the
    runner of the error users get."""
    name = f"the quantized model of {run.loaded.path}"
    validation = validate_outputs(
        run.loaded.path, exported, run.providers, data.recorded(max_batches), max_batches, name
    )
    run.validator = validation.output_validator
    return validation

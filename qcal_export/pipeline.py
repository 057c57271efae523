"""One calibration run: plan -> capture -> calibrate -> export, as ``calibrate_onnx``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import numpy_helper

from qcal_export.artifacts.report import build_report, save_report
from qcal_export.artifacts.scales import TensorScales, load_scales, save_scales
from qcal_export.atomic import check_writable
from qcal_export.calibrators import CALIBRATORS, Calibrator, MaxCalibrator
from qcal_export.capture.data import DataSource, open_data
from qcal_export.capture.onnxruntime import OrtCapture, open_session, select_providers
from qcal_export.errors import CalibrationError, DataError, RecipeError
from qcal_export.formats import AMAX_FLOOR, get_format
from qcal_export.granularity import PerAxis, PerTensor
from qcal_export.graphs.export import check_scales_match, export_qdq
from qcal_export.graphs.model_io import LoadedModel, load_model, save_model
from qcal_export.graphs.targets import Plan, find_targets, name_nodes
from qcal_export.graphs.validate import check_model, compare_outputs
from qcal_export.recipe import Recipe, TensorSpec

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
    timings: dict[str, float] = field(default_factory=dict)


def make_calibrator(
    spec: TensorSpec, granularity: PerTensor | PerAxis, nonfinite: str
) -> Calibrator:
    """The calibrator a spec names, for one tensor."""
    return CALIBRATORS[spec.method](
        get_format(spec.format), granularity, nonfinite=nonfinite, **spec.options
    )


def tensor_scales(
    name: str, kind: str, spec: TensorSpec, cal: Calibrator, axis: int | None
) -> TensorScales:
    """Turn a calibrator's decision into scales, with notes on floored or skipped values."""
    fmt = get_format(spec.format)
    notes = []
    found = cal.compute_range()
    if found is None:
        shape = cal.stat_shape or ()
        found = (torch.zeros(shape), torch.zeros(shape))
        notes.append("no values collected: amax floored")
    amin, amax = (t.float().cpu() for t in found)
    bound = torch.maximum(amin.abs(), amax.abs())
    if not notes and bool((bound <= AMAX_FLOOR).any()):
        notes.append(f"zero range: amax floored to {AMAX_FLOOR:g}")
    if cal.nonfinite_count:
        notes.append(f"{cal.nonfinite_count} non-finite values skipped")
    scale, zero_point = fmt.scale_zero_point(amin, amax)
    return TensorScales(
        name=name,
        kind=kind,
        format=spec.format,
        method=spec.method,
        axis=axis,
        amax=bound.clamp_min(AMAX_FLOOR),
        min=None if fmt.symmetric else amin,
        max=None if fmt.symmetric else amax,
        scale=scale,
        zero_point=zero_point,
        options=dict(spec.options),
        notes=notes,
    )


def _first_pass_calibrator(cal: Calibrator) -> Calibrator:
    """A max calibrator when ``cal`` needs an initial range, else ``cal`` itself."""
    if cal.needs_initial_range:
        return MaxCalibrator(cal.fmt, cal.granularity, nonfinite=cal.nonfinite)
    return cal


def _second_pass(
    cals: dict[str, Calibrator], firsts: dict[str, Calibrator]
) -> dict[str, Calibrator]:
    """The calibrators that take a second pass, their initial range set from the first.

    A tensor whose first pass saw no value keeps an empty calibrator (its scales get floored).
    """
    second = {}
    for tensor, cal in cals.items():
        found = firsts[tensor].compute_range() if firsts[tensor] is not cal else None
        if found is not None:
            cal.set_initial_range(*found)
            second[tensor] = cal
    return second


def calibrate_weights(
    model: onnx.ModelProto, plan: Plan, nonfinite: str
) -> dict[str, TensorScales]:
    """Calibrate every planned weight from its initializer, per output channel where planned."""
    initializers = {t.name: t for t in model.graph.initializer}
    scales = {}
    for tensor, weight in plan.weights.items():
        granularity = PerTensor() if weight.axis is None else PerAxis(weight.axis)
        cal = make_calibrator(weight.spec, granularity, nonfinite)
        values = torch.from_numpy(numpy_helper.to_array(initializers[tensor]).copy())
        first = _first_pass_calibrator(cal)
        first.collect(values)
        if _second_pass({tensor: cal}, {tensor: first}):
            cal.collect(values)
        scales[tensor] = tensor_scales(tensor, "weight", weight.spec, cal, weight.axis)
    return scales


def calibrate_activations(
    capture: OrtCapture,
    plan: Plan,
    source: DataSource,
    nonfinite: str,
    max_batches: int | None,
    progress: ProgressFactory | None,
) -> tuple[dict[str, TensorScales], list[int]]:
    """Stream the data through ORT (a second pass where a method needs an initial range)."""
    cals = {t: make_calibrator(a.spec, PerTensor(), nonfinite) for t, a in plan.activations.items()}
    firsts = {t: _first_pass_calibrator(cal) for t, cal in cals.items()}
    counts = [_capture_pass(capture, firsts, source, max_batches, progress, "pass 1")]
    second = _second_pass(cals, firsts)
    if second:
        counts.append(_capture_pass(capture, second, source, max_batches, progress, "pass 2"))
    scales = {
        t: tensor_scales(t, "activation", plan.activations[t].spec, cal, None)
        for t, cal in cals.items()
    }
    return scales, counts


def _capture_pass(
    capture: OrtCapture,
    cals: dict[str, Calibrator],
    source: DataSource,
    max_batches: int | None,
    progress: ProgressFactory | None,
    label: str,
) -> int:
    def sink(tensor: str, value: torch.Tensor) -> None:
        try:
            cals[tensor].collect(value)
        except CalibrationError as e:
            raise DataError(f"activation {tensor!r}: {e}") from None

    with progress(f"calibrating ({label})") if progress else nullcontext() as on_batch:
        return capture.run(
            source, sink, tensors=list(cals), max_batches=max_batches, on_batch=on_batch
        )


def build_recipe(
    recipe: Recipe | None,
    *,
    format: str,
    method: str,
    weight_method: str,
    per_channel_weights: bool,
    exclude: tuple[str, ...],
    exclude_op_types: tuple[str, ...],
    weights_mode: str,
    nonfinite: str,
) -> Recipe:
    """The recipe given, or one built from the keyword options."""
    if recipe is not None:
        return recipe
    return Recipe(
        activation=TensorSpec(format=format, method=method),
        weight=TensorSpec(format=format, method=weight_method, per_channel=per_channel_weights),
        exclude_nodes=tuple(exclude),
        exclude_op_types=tuple(exclude_op_types),
        weights_mode=weights_mode,
        nonfinite=nonfinite,
    )


def calibrate_onnx(
    model: str | Path,
    data: Any = None,
    *,
    output: str | Path | None = None,
    scales: str | Path | None = None,
    report: str | Path | None = None,
    recipe: Recipe | None = None,
    format: str = "int8",
    method: str = "max",
    weight_method: str = "max",
    per_channel_weights: bool = True,
    exclude: tuple[str, ...] = (),
    exclude_op_types: tuple[str, ...] = (),
    weights_mode: str = "quantized",
    nonfinite: str = "skip",
    batch_size: int | None = None,
    max_batches: int | None = None,
    provider: str = "auto",
    scales_in: str | Path | None = None,
    validate_batches: int = 4,
    progress: ProgressFactory | None = None,
) -> CalibrationResult:
    """Calibrate ``model`` on ``data`` and write the QDQ model, scales and report asked for.

    ``data``: a .npz file, a directory of .npz/.npy, an iterable of {input: array} dicts or an
    ORT CalibrationDataReader. With ``scales_in`` the scales come from that file instead
    (``data`` then only serves validation). The input model file is never written.
    """
    recipe = build_recipe(
        recipe,
        format=format,
        method=method,
        weight_method=weight_method,
        per_channel_weights=per_channel_weights,
        exclude=exclude,
        exclude_op_types=exclude_op_types,
        weights_mode=weights_mode,
        nonfinite=nonfinite,
    )
    for path, what in ((output, "output model"), (scales, "scales file"), (report, "report")):
        if path is not None:
            check_writable(path, what)
    run = _plan(model, recipe, data, batch_size, provider)
    with _timed(run, "calibrate_s"):
        found = _scales(run, scales_in, max_batches, progress)
    with _timed(run, "export_s"):
        exported = export_qdq(run.loaded.proto, run.plan, found, recipe.weights_mode)
    errors: dict[str, dict[str, float]] = {}
    if run.source is not None and validate_batches > 0:
        with _timed(run, "validate_s"):
            errors = _output_error(run, exported.model, validate_batches)
    result = CalibrationResult(scales=found, report={}, timings=run.timings)
    if output is not None:
        result.model_path = save_model(
            exported.model, output, external_data=run.loaded.external_data
        )
    if scales is not None:
        result.scales_path = save_scales(scales, found, run.loaded.sha256)
    result.report = build_report(run, found, exported, errors, result)
    if report is not None:
        result.report_path = save_report(report, result.report)
    return result


@dataclass
class Run:
    """What one calibration works on: the model, the plan and the data.

    ``loaded.proto`` is edited into the QDQ model in place (one copy of the weights in memory);
    the float reference for validation is read from ``loaded.path``, which is never written.
    """

    loaded: LoadedModel
    plan: Plan
    recipe: Recipe
    source: DataSource | None
    providers: list[str]
    batches_per_pass: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@contextmanager
def _timed(run: Run, key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    run.timings[key] = time.perf_counter() - start


def _plan(
    model: str | Path, recipe: Recipe, data: Any, batch_size: int | None, provider: str
) -> Run:
    """Load and check the model, plan its targets, open the data; nothing runs yet."""
    loaded = load_model(model)
    check_model(loaded.proto, str(loaded.path), full=False)
    name_nodes(loaded.proto)
    plan = find_targets(loaded.proto, recipe)
    if not plan.activations and not plan.weights:
        raise RecipeError(
            f"{loaded.path}: no node of types {list(recipe.op_types)} left to quantize "
            f"(excluded: {plan.excluded[:5]})"
        )
    source = open_data(data, batch_size=batch_size) if data is not None else None
    return Run(loaded, plan, recipe, source, select_providers(provider))


def _scales(
    run: Run,
    scales_in: str | Path | None,
    max_batches: int | None,
    progress: ProgressFactory | None,
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
    if run.source is None and run.plan.activations:
        raise DataError("calibration needs data: pass --data (or scales_in to reuse saved scales)")
    found = calibrate_weights(run.loaded.proto, run.plan, run.recipe.nonfinite)
    if run.plan.activations:
        types = {t: a.elem_type for t, a in run.plan.activations.items()}
        capture = OrtCapture(
            run.loaded.proto, types, providers=run.providers, name=str(run.loaded.path)
        )
        activations, run.batches_per_pass = calibrate_activations(
            capture, run.plan, run.source, run.recipe.nonfinite, max_batches, progress
        )
        found.update(activations)
    return found


def _output_error(
    run: Run, exported: onnx.ModelProto, max_batches: int
) -> dict[str, dict[str, float]]:
    """Error of the QDQ model's outputs against the float model's, on the first batches."""
    reference = open_session(run.loaded.path, run.providers, str(run.loaded.path))
    candidate = open_session(exported, run.providers, "the quantized model")
    return compare_outputs(reference, candidate, exported, run.source, max_batches)

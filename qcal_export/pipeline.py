"""One calibration run: plan -> capture -> calibrate -> export, as ``calibrate_onnx``."""

from __future__ import annotations

import fnmatch
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from qcal_export.accuracy import Accuracy, prepare, refine, target_from
from qcal_export.activation_calibration import calibrate_activations, hessian_inputs
from qcal_export.artifacts.onnx_layers import check_checkpoint_dir, write_checkpoints
from qcal_export.artifacts.report import build_report, save_report
from qcal_export.artifacts.scales import TensorScales, load_scales, save_scales
from qcal_export.atomic import check_writable
from qcal_export.calibration import Collector, calibrate_weights, relative_weight_errors
from qcal_export.capture.data import DataSource, check_count, open_data
from qcal_export.capture.onnxruntime import OrtCapture, select_providers
from qcal_export.distributed import Ranks, ranks_from_env
from qcal_export.errors import DataError, RecipeError, RuntimeMismatchError
from qcal_export.graphs.export import check_scales_match, export_qdq
from qcal_export.graphs.model_io import (
    LoadedModel,
    check_opset,
    external_data_files,
    load_model,
    save_model,
)
from qcal_export.graphs.targets import Plan, find_targets, name_nodes, skipped_reasons
from qcal_export.graphs.tensor_types import tensor_types
from qcal_export.graphs.validate import Validation, check_model, validate_outputs
from qcal_export.paths import check_paths
from qcal_export.recipe import Recipe, load_recipe
from qcal_export.recipe_options import recipe_from_options
from qcal_export.resume import StateFile

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
    **options: Any,
) -> CalibrationResult:
    """Calibrate ``model`` on ``data`` and write the QDQ model, scales and report asked for.

    ``data``: a .npz file, a directory of .npz/.npy, an iterable of {input: array} dicts or an
    ORT CalibrationDataReader. ``recipe``: a Recipe, or a YAML/JSON recipe file to load. With
    ``scales_in`` the scales come from that file instead (``data`` then only serves
    validation). ``options`` build the recipe when none is given (``format``, ``method``,
    ``weight_method``, ``block_size``, ...: see ``recipe_options.build_recipe``).
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
    (the reference); where the default fails or disagrees, a warning names the ORT optimizer at
    fault and the report's ``validation`` section records it. ``strict``: then raise
    RuntimeMismatchError (CLI exit code 3) once the outputs and the report are written.
    No input (the model, its external data, the data, ``scales_in``, the recipe file) is ever
    written: an output on one of them, or on another output, is refused before anything runs.
    """
    recipe_file = recipe if isinstance(recipe, (str, Path)) else None
    recipe = recipe_from_options(load_recipe(recipe_file) if recipe_file else recipe, options)
    check_count("max_batches (--batches)", max_batches, 1, optional=True)
    check_count("validate_batches (--validate-batches)", validate_batches, 0)
    accuracy = Accuracy(
        layer_view, target_from(target_cosine, target_rel_l2), holdout_every, view_batches, smooth
    )
    accuracy.check(scales_in)
    run = _plan(model, recipe, data, batch_size, provider)
    reads = _check_request(
        run,
        checkpoint_layouts,
        data=data,
        recipe=recipe_file,
        scales_in=scales_in,
        output=output,
        scales=scales,
        report=report,
        state=state,
        checkpoint=checkpoint,
    )
    run.device_id = device_id
    run.ranks = ranks_from_env(cuda="CUDAExecutionProvider" in run.providers)
    if run.ranks.world > 1:
        _shard(run, accuracy, state, resume)
        if not run.ranks.writes:
            output = scales = report = checkpoint = None
            validate_batches = 0
    holdout, sections = prepare(run, accuracy, max_batches)
    if state is not None:
        identity = _identity(run, max_batches, batch_size)
        identity.update(smooth=smooth, holdout_every=holdout_every if holdout else None)
        run.state = StateFile(state, identity, every=state_every)
    elif resume:
        raise RecipeError("resume needs the state file to resume from: pass state=PATH (--state)")
    with run.timed("calibrate_s"):
        found = _scales(run, scales_in, max_batches, progress, resume)
    found, analysis = refine(run, found, accuracy, holdout, sections)
    run.weight_errors = relative_weight_errors(run.loaded.proto, found.values())
    result = CalibrationResult(scales=found, report={}, timings=run.timings)
    if checkpoint is not None:
        with run.timed("checkpoint_s"):
            result.checkpoint_paths = write_checkpoints(
                run.loaded.proto, run.plan, found, checkpoint, checkpoint_layouts
            )
    with run.timed("export_s"):
        exported = export_qdq(
            run.loaded.proto, run.plan, found, recipe.weights_mode, recipe.nvfp4_form
        )
    validation = None
    if run.source is not None and validate_batches > 0:
        with run.timed("validate_s"):
            validation = _output_error(run, exported.model, validate_batches)
    if output is not None:
        result.model_path = save_model(
            exported.model, output, external_data=run.loaded.external_data, keep=reads
        )
    if scales is not None:
        result.scales_path = save_scales(scales, found, run.loaded.sha256)
    result.report = {**build_report(run, found, exported, validation, result), **sections}
    if analysis is not None:
        with run.timed("heldout_s"):
            result.report.update(analysis.report(run, exported.model, holdout))
    if report is not None:
        result.report_path = save_report(report, result.report)
    if strict and validation is not None and validation.issue is not None:
        paths = (result.model_path, result.scales_path, result.report_path)
        written = ", ".join(str(p) for p in paths if p) or "nothing asked"
        raise RuntimeMismatchError(f"--strict: {validation.issue.summary}; written: {written}")
    return result


def _shard(run: Run, accuracy: Accuracy, state: str | Path | None, resume: bool) -> None:
    """This rank's share of the data (and, under CUDA, its own GPU: ``LOCAL_RANK``); the
    options that do not run across processes yet are refused."""
    auto = any(a.spec.method == "auto" for a in run.plan.activations.values())
    one_process = accuracy.layer_view or accuracy.target or accuracy.smooth is not None
    if one_process or auto or state is not None or resume:
        raise RecipeError(
            "smoothing, method auto, the layer view, precision targets and state files run in "
            "one process only: calibrate without torchrun (--nproc) for them"
        )
    if run.source is not None:
        run.source = run.ranks.shard(run.source)
    if "CUDAExecutionProvider" in run.providers:
        run.device_id = int(os.environ.get("LOCAL_RANK", run.device_id))


def _check_request(run: Run, checkpoint_layouts: tuple[str, ...], **paths: Any) -> frozenset[Path]:
    """Refuse what cannot be written, or would land on an input or another output, before
    anything runs; warn about torch-only fields. Returns the files read (no write removes them).
    """
    torch_only = [k for k in ("output", "module_types", "modules") if getattr(run.recipe, k)]
    if torch_only:
        log.warning(
            "recipe fields %s apply to torch models only; the ONNX run ignores them", torch_only
        )
    outputs = {"output": "output model", "scales": "scales file", "report": "report"}
    for key, what in {**outputs, "state": "state file"}.items():
        if paths[key] is not None:
            check_writable(paths[key], what)
    if paths["checkpoint"] is not None:
        check_checkpoint_dir(paths["checkpoint"], checkpoint_layouts)
    model_data = external_data_files(run.loaded.path) if run.loaded.external_data else []
    return check_paths(
        model=run.loaded.path,
        model_data=model_data,
        checkpoint_layouts=checkpoint_layouts,
        **paths,
    )


def _identity(run: Run, max_batches: int | None, batch_size: int | None) -> dict[str, Any]:
    """What a resumed run must share with the one that saved its state."""
    return {
        "model_sha256": run.loaded.sha256,
        "recipe": run.recipe.to_dict(),
        "max_batches": max_batches,
        "batch_size": batch_size,
    }


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
    weight_errors: dict[str, float] = field(default_factory=dict)
    validator: str = ""
    state: StateFile | None = None
    device_id: int = 0
    ranks: Ranks = field(default_factory=Ranks)
    candidates: dict[str, dict[str, TensorScales]] = field(default_factory=dict)

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Time the block into ``timings[key]`` (seconds)."""
        start = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - start


def _plan(
    model: str | Path, recipe: Recipe, data: Any, batch_size: int | None, provider: str
) -> Run:
    """Load and check the model, plan its targets, open the data; nothing runs yet."""
    loaded = load_model(model)
    check_opset(loaded.proto, str(loaded.path))
    check_model(loaded.proto, str(loaded.path), full=False, path=loaded.path)
    name_nodes(loaded.proto)
    plan = find_targets(loaded.proto, recipe)
    plan.notes += unmatched_patterns(loaded.proto, recipe, str(loaded.path))
    for note in plan.notes:
        log.warning("%s", note)
    if not plan.activations and not plan.weights:
        raise RecipeError(
            f"{loaded.path}: no node of types {list(recipe.op_types)} left to quantize "
            f"(excluded: {plan.excluded[:5]})"
            + (f": {skipped_reasons(plan)}" if plan.skipped else "")
        )
    source = open_data(data, batch_size=batch_size) if data is not None else None
    return Run(loaded, plan, recipe, source, select_providers(provider))


def unmatched_patterns(model: onnx.ModelProto, recipe: Recipe, name: str) -> list[str]:
    """Notes on exclude / override node patterns with wildcards that match no node of the main
    graph; RecipeError for a plain node name that matches none (a typo, or another model)."""
    nodes = [n.name for n in model.graph.node]
    patterns = [("exclude", p) for p in recipe.exclude_nodes]
    patterns += [(f"overrides[{i}]", o.nodes) for i, o in enumerate(recipe.overrides)]
    notes = []
    for where, pattern in patterns:
        if any(fnmatch.fnmatchcase(node, pattern) for node in nodes):
            continue
        if not any(c in pattern for c in "*?["):
            raise RecipeError(
                f"{where} names node {pattern!r}, which {name} does not have: check the name "
                "(`qcal inspect MODEL` lists the quantizable nodes) or use a pattern"
            )
        notes.append(f"{where} pattern {pattern!r} matches no node of {name}")
    return notes


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


def _output_error(run: Run, exported: onnx.ModelProto, max_batches: int) -> Validation:
    """Error of the QDQ model's outputs against the float model's, on the first batches: in ONNX
    Runtime as users run it (default optimizations) and in a reference (optimizations off; the
    ONNX reference evaluator for FLOAT4E2M1 and TensorRT's ops); ``run.validator`` names the
    runner of the error users get."""
    name = f"the quantized model of {run.loaded.path}"
    validation = validate_outputs(
        run.loaded.path, exported, run.providers, run.source, max_batches, name
    )
    run.validator = validation.output_validator
    return validation

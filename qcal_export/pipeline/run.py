"""What one calibration works on (``Run``), writes (``Outputs``) and returns
(``CalibrationResult``), and how ``calibrate_onnx`` sets them up: the model loaded, checked and
planned, the data opened, and every output path checked before anything runs."""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from qcal_export.analysis.planned import PlannedModel
from qcal_export.artifacts.calib_table import check_table_plan
from qcal_export.artifacts.html_plots import require_matplotlib
from qcal_export.artifacts.onnx_layers import check_checkpoint_dir, check_checkpoint_recipe
from qcal_export.calibrate.distributed import Ranks
from qcal_export.calibrate.resume import StateFile
from qcal_export.capture.data import DataSource, model_inputs, open_data
from qcal_export.capture.forms import DataOptions
from qcal_export.capture.onnxruntime import select_providers
from qcal_export.capture.random_data import NO_ACCURACY
from qcal_export.errors import RecipeError
from qcal_export.files.atomic import check_writable
from qcal_export.files.paths import check_paths
from qcal_export.graphs.opset_first import converted_for_export, opset_change
from qcal_export.graphs.preprocess import PreprocessResult, preprocess
from qcal_export.graphs.targets import find_targets, skipped_reasons
from qcal_export.onnx_io.model_io import (
    LoadedModel,
    check_model,
    check_opset,
    external_data_files,
    load_model,
)
from qcal_export.spec.choices import Int4Layout
from qcal_export.spec.config import CalibrationConfig
from qcal_export.spec.methods import METHODS
from qcal_export.spec.plan import Plan
from qcal_export.spec.recipe import Recipe
from qcal_export.spec.scales import TensorScales
from qcal_export.spec.trt_version import DEFAULT_TRT_VERSION

log = logging.getLogger(__name__)


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
    activation_detail: dict[str, dict[str, Any]] = field(default_factory=dict)
    preprocessed: PreprocessResult | None = None

    def partial_nodes(self) -> dict[str, str]:
        """Planned nodes not quantized as they should be (a weight not found, an input of a
        type without Q/DQ), each with why: they do not count as quantized."""
        unfound = self.preprocessed.unfound_weights if self.preprocessed else {}
        partial = {node: why for node, why in unfound.items() if node in self.plan.nodes}
        return {**partial, **self.plan.partial}

    def planned(self) -> PlannedModel:
        """The model and plan as they stand now, read-only, for the accuracy steps."""
        return PlannedModel(
            self.loaded.proto,
            self.plan,
            self.recipe,
            self.loaded.path,
            self.providers,
            self.device_id,
        )

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Time the block into ``timings[key]`` (seconds)."""
        start = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - start


@dataclass
class CalibrationResult:
    """Scales per tensor, the report (a JSON-able dict) and the paths written."""

    scales: dict[str, TensorScales]
    report: dict[str, Any]
    model_path: Path | None = None
    scales_path: Path | None = None
    report_path: Path | None = None
    html_path: Path | None = None
    checkpoint_paths: dict[str, Path] = field(default_factory=dict)
    calib_table_path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Outputs:
    """What a run writes (None: not asked): the QDQ model, the scales file, the report and the
    checkpoints in their layouts; how many batches validate the QDQ model, whether a runtime
    mismatch found there then raises (``strict``), and the files read, which no write removes;
    how 4-bit MatMul weights are laid out, and the calibration table asked for (its file, form
    and TensorRT version)."""

    model: str | Path | None
    scales: str | Path | None
    report: str | Path | None
    checkpoint: str | Path | None
    checkpoint_layouts: tuple[str, ...]
    validate_batches: int
    strict: bool = False
    keep: frozenset[Path] = frozenset()
    int4_layout: str = "qdq"
    calib_table: str | Path | None = None
    calib_table_form: str = "tensorrt"
    trt_version: str = DEFAULT_TRT_VERSION
    html: str | Path | None = None


def plan_run(
    model: str | Path,
    recipe: Recipe,
    data: Any,
    batch_size: int | None,
    provider: str,
    data_options: DataOptions | None = None,
) -> Run:
    """Load, check and pre-process the model (in memory: the file is never written), plan its
    targets, open the data (``data_options``: how images, texts or random data become its
    inputs); nothing runs yet."""
    loaded = load_model(model)
    try:
        return _plan_loaded(loaded, recipe, data, batch_size, provider, data_options)
    except BaseException:
        loaded.store.release()
        raise


def _plan_loaded(
    loaded: LoadedModel,
    recipe: Recipe,
    data: Any,
    batch_size: int | None,
    provider: str,
    data_options: DataOptions | None,
) -> Run:
    check_opset(loaded.proto, str(loaded.path))
    check_model(loaded.proto, str(loaded.path), full=False)
    preprocessed = preprocess(loaded.proto)
    loaded.proto = preprocessed.model
    plan = find_targets(loaded.proto, recipe)
    converted = converted_for_export(loaded.proto, plan)
    if converted is not None:
        preprocessed.changes.append(opset_change(loaded.proto, converted))
        preprocessed.opset_from = loaded.opset
        loaded.proto = preprocessed.model = converted
        plan = find_targets(loaded.proto, recipe)
    for change in preprocessed.changes:
        log.info("pre-processing: %s", change)
    plan.notes += unmatched_patterns(loaded.proto, recipe, str(loaded.path))
    for note in [*preprocessed.unfound_weights.values(), *plan.notes]:
        log.warning("%s", note)
    for note in plan.placement_notes:
        log.info("%s", note)
    if not plan.activations and not plan.weights:
        present = {node.op_type for node in loaded.proto.graph.node}
        types = [t for t in recipe.op_types if t in present] or list(recipe.op_types)
        raise RecipeError(
            f"{loaded.path}: no node of types {types} left to quantize "
            f"(excluded: {plan.excluded[:5]})"
            + (f": {skipped_reasons(plan)}" if plan.skipped else "")
        )
    source = None
    if data is not None:
        inputs = functools.partial(model_inputs, loaded.proto, str(loaded.path))
        source = open_data(data, batch_size=batch_size, options=data_options, inputs=inputs)
        if source.synthetic:
            plan.notes.append(NO_ACCURACY)
    run = Run(loaded, plan, recipe, source, select_providers(provider))
    run.preprocessed = preprocessed
    return run


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


def asked_outputs(config: CalibrationConfig) -> Outputs:
    """The files ``config`` asks for, and how the QDQ model is validated."""
    wanted, validation = config.outputs, config.validation
    return Outputs(
        wanted.output,
        wanted.scales,
        wanted.report,
        wanted.checkpoint,
        wanted.checkpoint_layouts,
        validation.validate_batches,
        validation.strict,
        int4_layout=wanted.int4_layout,
        calib_table=wanted.trt_calib_table,
        calib_table_form=wanted.trt_calib_form,
        trt_version=wanted.trt_calib_version,
        html=wanted.html,
    )


WRITTEN = {
    "output": "output model",
    "scales": "scales file",
    "report": "report",
    "trt_calib_table": "calibration table",
    "html": "HTML report",
    "state": "state file",
}
"""The files a run writes, by their key in ``check_request``'s paths, as its messages name them."""


def check_request(
    run: Run, outputs: Outputs, config: CalibrationConfig, data: Any, data_options: Any
) -> frozenset[Path]:
    """Refuse what cannot be written, or would land on an input or another output, before
    anything runs; warn about torch-only fields. Returns the files read (no write removes them).

    The inputs checked: ``data`` (and ``data_options``: a tokenizer directory is read too), and
    ``config``'s validation data, recipe file, saved scales and state file.
    """
    checkpoint_layouts = outputs.checkpoint_layouts
    paths = dict(
        output=outputs.model,
        scales=outputs.scales,
        report=outputs.report,
        html=outputs.html,
        checkpoint=outputs.checkpoint,
        trt_calib_table=outputs.calib_table,
        data=data,
        data_options=data_options,
        validate_data=config.validation.validate_data,
        recipe=config.quantization.recipe_file,
        scales_in=config.quantization.scales_in,
        state=config.state.state,
    )
    torch_only = [k for k in ("output", "module_types", "modules") if getattr(run.recipe, k)]
    if torch_only:
        log.warning(
            "recipe fields %s apply to torch models only; the ONNX run ignores them", torch_only
        )
    if paths["html"] is not None:
        require_matplotlib()
    for key, what in WRITTEN.items():
        if paths[key] is not None:
            check_writable(paths[key], what)
    if paths["checkpoint"] is not None:
        check_checkpoint_dir(paths["checkpoint"], checkpoint_layouts)
    model_data = external_data_files(run.loaded.path) if run.loaded.external_data else []
    read = check_paths(
        model=run.loaded.path,
        model_data=model_data,
        checkpoint_layouts=checkpoint_layouts,
        **paths,
    )
    if paths["checkpoint"] is not None:
        check_checkpoint_recipe(run.recipe, checkpoint_layouts)
    _check_layouts(run, outputs)
    return read


def _check_layouts(run: Run, outputs: Outputs) -> None:
    """RecipeError where the calibration table or the MatMulNBits layout cannot hold the run's
    quantization."""
    if outputs.calib_table is not None:
        check_table_plan(run.plan)
    if outputs.int4_layout == Int4Layout.MATMULNBITS and run.recipe.weights_mode != "quantized":
        raise RecipeError(
            "--int4-layout matmulnbits stores the weights quantized: it cannot go with "
            f"--weights-mode {run.recipe.weights_mode}"
        )


def state_file(run: Run, config: CalibrationConfig, split: bool) -> StateFile | None:
    """The state file ``config`` asks for (None: none). A resumed run must share the model,
    the recipe and the batch options with the one that saved it (``identity``); the rest of
    the config (output paths, validation, ...) is recorded beside, not compared."""
    if config.state.state is None:
        return None
    identity = {
        "model_sha256": run.loaded.sha256,
        "recipe": run.recipe.to_dict(),
        "max_batches": config.data.max_batches,
        "batch_size": config.data.batch_size,
        "smooth": config.accuracy.smooth,
        "holdout_every": config.accuracy.holdout_every if split else None,
    }
    return StateFile(
        config.state.state, identity, every=config.state.state_every, config=config.record()
    )


def shard_run(run: Run, one_process: bool, state: str | Path | None, resume: bool) -> None:
    """This rank's share of the data (and, under CUDA, its own GPU: ``LOCAL_RANK``); the
    options that do not run across processes yet are refused (``one_process``: the accuracy
    steps asked for)."""
    auto = any(METHODS[a.spec.method].searches for a in run.plan.activations.values())
    if one_process or auto or state is not None or resume:
        raise RecipeError(
            "smoothing, method auto, the layer view, precision targets and state files run in "
            "one process only: calibrate without torchrun (--nproc) for them"
        )
    if run.source is not None:
        run.source = run.ranks.shard(run.source)
    if "CUDAExecutionProvider" in run.providers:
        run.device_id = int(os.environ.get("LOCAL_RANK", run.device_id))

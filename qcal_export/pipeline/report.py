"""The run's report: what was quantized, how, what was noted, and the validated output error,
built from the run's state by the orchestrator that owns it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qcal_export.artifacts.report import SCHEMA_VERSION, tensor_row
from qcal_export.artifacts.scales import versions
from qcal_export.spec.scales import TensorScales

if TYPE_CHECKING:
    from qcal_export.graphs.export import ExportResult
    from qcal_export.pipeline.run import CalibrationResult, Run
    from qcal_export.validation.validate import Validation


def build_report(
    run: Run,
    scales: dict[str, TensorScales],
    exported: ExportResult,
    validation: Validation | None,
    result: CalibrationResult,
) -> dict[str, Any]:
    """A JSON-able summary of one run.

    ``output_error`` is the error users get: ONNX Runtime at its default optimizations, or the
    reference where ORT cannot run the model (``validator`` names which); ``validation`` holds
    both figures and any runtime issue (None when no batch was validated).
    ``quantized_nodes`` leaves out ``partially_quantized_nodes`` (a weight not found, say).
    ``activations``: per activation its histogram, the range each of its calibrators chose and
    the MSE methods' losses (``calibrate/detail.py``); the layout is ``report_schema.json``'s.
    """
    partial = run.partial_nodes()
    return {
        "schema_version": SCHEMA_VERSION,
        "model": str(run.loaded.path),
        "model_sha256": run.loaded.sha256,
        "output_model": str(result.model_path) if result.model_path else None,
        "scales_file": str(result.scales_path) if result.scales_path else None,
        "checkpoints": {k: str(v) for k, v in result.checkpoint_paths.items()},
        "trt_calib_table": str(result.calib_table_path) if result.calib_table_path else None,
        "recipe": run.recipe.to_dict(),
        "providers": run.providers,
        "data": None
        if run.source is None
        else {"source": run.source.description, "random": run.source.synthetic},
        "batches_per_pass": run.batches_per_pass,
        "opset": {"from": file_opset(run, exported.opset_from), "to": exported.opset_to},
        "quantized_nodes": [n for n in run.plan.nodes if n not in partial],
        "partially_quantized_nodes": partial,
        "preprocess": run.preprocessed.to_report() if run.preprocessed else None,
        "target": run.recipe.target,
        "shared_scales": {t: entry.source for t, entry in run.plan.shared.items()},
        "excluded_nodes": run.plan.excluded,
        "float_subgraph_nodes": run.plan.float_subgraph_nodes,
        "plan_notes": [*run.plan.notes, *run.plan.placement_notes],
        "tensors": [tensor_row(s, run.weight_errors) for s in scales.values()],
        "activations": run.activation_detail,
        "export_notes": exported.notes,
        "validator": run.validator or None,
        "output_error": {} if validation is None else validation.output_error,
        "validation": None if validation is None else validation.to_report(),
        "timings": run.timings,
        "versions": versions(),
    }


def file_opset(run: Run, export_from: int) -> int:
    """The input file's opset: the export's starting one, unless pre-processing raised it."""
    raised = run.preprocessed.opset_from if run.preprocessed else None
    return export_from if raised is None else raised

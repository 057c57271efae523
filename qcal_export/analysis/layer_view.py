"""The pipeline's per-layer analysis: the switchable form of the run's model, the per-layer
view, the precision search for a target, the plan narrowed to what stays quantized, and the
report (with the exported model's own error on the held-out batches)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import onnx
from onnx import numpy_helper

from qcal_export.analysis.sensitivity import (
    LayerView,
    OutputError,
    PrecisionChoice,
    SwitchedRuns,
    Target,
    choose_methods,
    layer_view,
    search_precision,
)
from qcal_export.calibrate.tensor import relative_weight_errors
from qcal_export.capture.data import DataSource
from qcal_export.capture.onnxruntime import open_session
from qcal_export.errors import RecipeError
from qcal_export.graphs.export import export_qdq
from qcal_export.graphs.switchable import Slot, switch_units, switchable_model, without_units
from qcal_export.spec.scales import TensorScales
from qcal_export.validation.validate import (
    float_outputs,
    needs_reference_evaluator,
    output_pairs,
    reference_runner,
)

if TYPE_CHECKING:
    from qcal_export.pipeline.run import Run


@dataclass
class Analysis:
    view: LayerView
    inputs: dict[str, list[Slot]]
    weight_sqnr_db: dict[str, float | None]
    choice: PrecisionChoice | None

    @property
    def float_nodes(self) -> list[str]:
        return [] if self.choice is None else [f["node"] for f in self.choice.float_nodes]

    def narrow(self, run: Run, found: dict[str, TensorScales]) -> dict[str, TensorScales]:
        """Leave the chosen units (nodes, shared-scale groups) in float: ``run.plan`` narrowed
        as the switchable model ran it, the scales still used."""
        if not self.float_nodes:
            return found
        run.plan = without_units(run.plan, self.inputs, set(self.float_nodes))
        planned = {*run.plan.activations, *run.plan.weights}
        return {tensor: s for tensor, s in found.items() if tensor in planned}

    def report(self, run: Run, exported: onnx.ModelProto, holdout: DataSource | None):
        """The report's ``layers`` and, with a target, ``precision`` sections."""
        rows = []
        for node, alone in self.view.alone.items():
            slots = self.inputs[node]
            acts = list(dict.fromkeys(s.tensor for s in slots if s.kind == "activation"))
            weights = list(dict.fromkeys(s.tensor for s in slots if s.kind == "weight"))
            rows.append(
                {
                    "node": node,
                    "precision": "float" if node in self.float_nodes else "quantized",
                    "activation_sqnr_db": {t: self.view.activation_sqnr_db.get(t) for t in acts},
                    "weight_sqnr_db": {t: self.weight_sqnr_db.get(t) for t in weights},
                    "output_error_quantized_alone": alone,
                }
            )
        section: dict[str, Any] = {
            "layers": rows,
            "layer_view": {"batches": self.view.batches, "all_quantized": self.view.all_quantized},
        }
        if self.choice is not None and holdout is not None:
            choice = self.choice
            section["precision"] = {
                "target": {"metric": choice.target.metric, "value": choice.target.value},
                "float_nodes": choice.float_nodes,
                "quantized_matmul_gemm": _matmul_share(run),
                "steps": choice.steps,
                "heldout_switchable": choice.heldout,
                "heldout_exported": exported_error(run, exported, holdout),
            }
        return section


def analyse_layers(
    run: Run,
    found: dict[str, TensorScales],
    holdout: DataSource | None,
    target: Target | None,
    batches: int,
) -> Analysis:
    """Per-layer view of the run's plan and scales, and the precision choice for ``target``."""
    runs = switched_runs(run, found)
    view = layer_view(runs, run.source, batches)
    choice = None
    if target is not None and holdout is not None:
        choice = search_precision(runs, view, holdout, target)
    errors = relative_weight_errors(run.loaded.proto, found.values())
    sqnr = {t: -20 * math.log10(e) if e > 0 else None for t, e in errors.items()}
    return Analysis(view, switch_units(run.plan), sqnr, choice)


def choose_activation_methods(
    run: Run, found: dict[str, TensorScales], batches: int
) -> tuple[dict[str, TensorScales], dict[str, Any]]:
    """Method ``auto``: per activation, the candidate nearest float by the graph outputs with
    only its consumers quantized (on the first ``batches`` calibration batches); the chosen
    scales and the report section."""
    runs = switched_runs(run, found)
    consumers = {
        t: [unit for unit, slots in runs.units.items() if any(s.tensor == t for s in slots)]
        for t in run.candidates
    }
    inits = {t.name: t for t in runs.model.graph.initializer}
    feeds = {
        tensor: {m: _scale_feed(s, runs.scales[tensor], inits) for m, s in methods.items()}
        for tensor, methods in run.candidates.items()
    }
    choice = choose_methods(runs, run.source, feeds, consumers, batches)
    chosen = {t: run.candidates[t][c["picked"]] for t, c in choice.items()}
    return chosen, choice


def _scale_feed(scales: TensorScales, names: tuple[str, str], inits: dict) -> dict[str, Any]:
    """A candidate's scale (and, for asymmetric formats, zero point) as the inputs that
    replace the exported initializers, in their dtypes."""
    q = scales.qparams()
    scale_name, zero_name = names
    dtype = numpy_helper.to_array(inits[scale_name]).dtype
    feed = {scale_name: q.scale.numpy().astype(dtype).reshape(inits[scale_name].dims)}
    if not q.fmt.symmetric:
        zero = numpy_helper.to_array(inits[zero_name])
        values = q.fmt.encode_zero_point(q.zero_point).numpy()
        feed[zero_name] = values.astype(zero.dtype).reshape(zero.shape)
    return feed


def switched_runs(run: Run, found: dict[str, TensorScales]) -> SwitchedRuns:
    """A session over the switchable form of the run's model under ``found``."""
    if run.source is None:
        raise RecipeError("the per-layer view, precision targets and method auto need data")
    original = run.loaded.proto  # still the float model (smoothed, if asked): export comes later
    model = onnx.ModelProto()
    model.CopyFrom(original)
    exported = export_qdq(model, run.plan, found, run.recipe.weights_mode, run.recipe.nvfp4_form)
    if needs_reference_evaluator(exported.model):
        raise RecipeError(
            "the per-layer view, precision targets and method auto run in ONNX Runtime, which "
            "cannot run this model's quantized form (FLOAT4E2M1 or TensorRT ops): not for nvfp4"
        )
    switchable = switchable_model(original, exported.model, run.plan)
    name = f"the switchable form of {run.loaded.path}"
    return SwitchedRuns(switchable, run.providers, name)


def exported_error(run: Run, exported: onnx.ModelProto, holdout: DataSource) -> dict[str, float]:
    """The exported model's output error against the float model's on the held-out batches."""
    reference = open_session(run.loaded.path, run.providers, str(run.loaded.path))
    candidate, _ = reference_runner(exported, run.providers)
    error = OutputError(float_outputs(reference))
    for refs, cands in output_pairs(reference, candidate, exported, holdout):
        error.add(refs, cands)
    return error.summary()


def _matmul_share(run: Run) -> dict[str, int]:
    """How many MatMul/Gemm nodes stay quantized, of those planned."""
    ops = {n.name: n.op_type for n in run.loaded.proto.graph.node}
    planned = [n for n in run.plan.nodes + run.plan.excluded if ops.get(n) in ("MatMul", "Gemm")]
    quantized = [n for n in run.plan.nodes if ops.get(n) in ("MatMul", "Gemm")]
    return {"quantized": len(quantized), "of": len(planned)}

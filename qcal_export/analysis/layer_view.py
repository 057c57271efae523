"""The per-layer analysis: the switchable form of the planned model, the per-layer view, the
precision search for a target, the plan narrowed to what stays quantized, and the report (with
the exported model's own error on the held-out batches)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from qcal_export.analysis.planned import PlannedModel
from qcal_export.analysis.sensitivity import (
    LayerView,
    PrecisionChoice,
    SwitchedRuns,
    Target,
    layer_view,
    search_precision,
)
from qcal_export.calibrate.tensor import relative_weight_errors
from qcal_export.capture.data import DataSource
from qcal_export.capture.onnxruntime import open_session
from qcal_export.errors import RecipeError
from qcal_export.graphs.export import export_qdq
from qcal_export.graphs.fp4_emulation import runnable_or_refuse
from qcal_export.graphs.switchable import Slot, switch_units, switchable_model, without_units
from qcal_export.spec.plan import Plan
from qcal_export.spec.scales import TensorScales
from qcal_export.validation.output_error import ErrorTally
from qcal_export.validation.validate import (
    float_outputs,
    output_pairs,
    reference_runner,
)


@dataclass
class Analysis:
    """What the per-layer analysis found: the view, each unit's switched inputs
    (``switch_units``), each weight's SQNR (dB) and the precision choice (None: no target)."""

    view: LayerView
    inputs: dict[str, list[Slot]]
    weight_sqnr_db: dict[str, float | None]
    choice: PrecisionChoice | None

    @property
    def float_nodes(self) -> list[str]:
        return [] if self.choice is None else [f["node"] for f in self.choice.float_nodes]

    def narrow(
        self, plan: Plan, found: dict[str, TensorScales]
    ) -> tuple[Plan, dict[str, TensorScales]]:
        """Leave the chosen units (nodes, shared-scale groups) in float: ``plan`` narrowed as
        the switchable model ran it (a new plan; ``plan`` itself where none is chosen) and the
        scales it still uses."""
        if not self.float_nodes:
            return plan, found
        narrowed = without_units(plan, self.inputs, set(self.float_nodes))
        planned = {*narrowed.activations, *narrowed.weights}
        return narrowed, {tensor: s for tensor, s in found.items() if tensor in planned}

    def report(
        self, planned: PlannedModel, exported: onnx.ModelProto, holdout: DataSource | None
    ) -> dict[str, Any]:
        """The report's ``layers`` and, with a target, ``precision`` sections (``planned``: the
        model and its plan as exported)."""
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
                "quantized_matmul_gemm": _matmul_share(planned.model, planned.plan),
                "steps": choice.steps,
                "heldout_switchable": choice.heldout,
                "heldout_exported": exported_error(
                    planned.path, planned.providers, exported, holdout
                ),
            }
        return section


def analyse_layers(
    planned: PlannedModel,
    source: DataSource | None,
    found: dict[str, TensorScales],
    holdout: DataSource | None,
    target: Target | None,
    batches: int,
) -> Analysis:
    """Per-layer view of the plan and scales on the first ``batches`` batches of ``source``, and
    the precision choice for ``target`` on the ``holdout`` batches."""
    runs = switched_runs(planned, source, found)
    view = layer_view(runs, source, batches)
    choice = None
    if target is not None and holdout is not None:
        choice = search_precision(runs, view, holdout, target)
    errors = relative_weight_errors(planned.model, found.values())
    sqnr = {t: -20 * math.log10(e) if e > 0 else None for t, e in errors.items()}
    return Analysis(view, switch_units(planned.plan), sqnr, choice)


def switched_runs(
    planned: PlannedModel, source: DataSource | None, found: dict[str, TensorScales]
) -> SwitchedRuns:
    """A session over the switchable form of the planned model under ``found``."""
    if source is None:
        raise RecipeError("the per-layer view and precision targets need data")
    original = planned.model  # still the float model (smoothed, if asked): export comes later
    model = onnx.ModelProto()
    model.CopyFrom(original)
    recipe = planned.recipe
    exported = export_qdq(model, planned.plan, found, recipe.weights_mode, recipe.nvfp4_form)
    runnable = runnable_or_refuse(
        exported.model,
        "the per-layer view and precision targets run in ONNX Runtime, and this model's "
        "quantized form holds what it cannot run",
    )
    switchable = switchable_model(original, runnable, planned.plan)
    return SwitchedRuns(switchable, planned.providers, f"the switchable form of {planned.path}")


def exported_error(
    float_model: Path, providers: list[str], exported: onnx.ModelProto, holdout: DataSource
) -> dict[str, float]:
    """The exported model's output error against the float model's (read from its file
    ``float_model``) on the held-out batches: the worst output's cosine and rel_l2."""
    reference = open_session(float_model, providers, str(float_model))
    candidate, _ = reference_runner(exported, providers)
    error = ErrorTally(float_outputs(reference))
    for refs, cands in output_pairs(reference, candidate, exported, holdout):
        error.add(refs, cands)
    return error.worst()


def _matmul_share(model: onnx.ModelProto, plan: Plan) -> dict[str, int]:
    """How many MatMul/Gemm nodes stay quantized, of those planned."""
    ops = {n.name: n.op_type for n in model.graph.node}
    planned = [n for n in plan.nodes + plan.excluded if ops.get(n) in ("MatMul", "Gemm")]
    quantized = [n for n in plan.nodes if ops.get(n) in ("MatMul", "Gemm")]
    return {"quantized": len(quantized), "of": len(planned)}

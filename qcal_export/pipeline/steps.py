"""The accuracy steps applied to the run: each step of ``analysis/`` reads the run's model and
plan as a ``PlannedModel`` and returns what it built or found; here the run takes it (the
smoothed model and its plan, the chosen scales, the narrowed plan) and times it."""

from __future__ import annotations

from typing import Any

from qcal_export.analysis.accuracy import Accuracy
from qcal_export.analysis.awq import apply_awq, check_awq_scales, uses_awq
from qcal_export.analysis.layer_view import Analysis, analyse_layers
from qcal_export.analysis.method_choice import choose_activation_methods
from qcal_export.analysis.mixed_formats import Levels, MixedAnalysis, analyse_formats
from qcal_export.analysis.smoothing import smooth
from qcal_export.capture.data import DataSource
from qcal_export.pipeline.run import Run
from qcal_export.spec.scales import TensorScales


def prepare(
    run: Run, accuracy: Accuracy, max_batches: int | None, scales_in: object = None
) -> dict[str, Any]:
    """Smooth the model if asked, then fold AWQ's factors where weights have method awq (the
    run then calibrates the changed model on its new plan); returns the report's
    ``smoothing`` and ``awq`` sections (or nothing)."""
    sections: dict[str, Any] = {}
    check_awq_scales(run.plan, scales_in)
    if accuracy.smooth is not None:
        with run.timed("smooth_s"):
            smoothed = smooth(run.planned(), run.source, accuracy.smooth, max_batches)
        run.loaded.proto, run.plan = smoothed.model, smoothed.plan
        sections["smoothing"] = {"alpha": accuracy.smooth, "notes": smoothed.notes}
    if uses_awq(run.plan):
        with run.timed("awq_s"):
            scaled = apply_awq(run.planned(), run.source, max_batches, run.ranks)
        run.loaded.proto, run.plan = scaled.model, scaled.plan
        run.batches_per_pass = [scaled.batches]
        sections["awq"] = {"inputs": scaled.section, "notes": scaled.notes}
    return sections


def refine(
    run: Run,
    found: dict[str, TensorScales],
    accuracy: Accuracy,
    holdout: DataSource | None,
    sections: dict[str, Any],
    levels: Levels | None = None,
) -> tuple[dict[str, TensorScales], Analysis | MixedAnalysis | None]:
    """Method ``auto``'s choice, then the per-layer view and the target's float nodes (or,
    given ``levels``, each node's format): the scales to export (``run.plan`` narrowed to
    them) and the analysis, if any."""
    if levels is not None and accuracy.target is not None:
        with run.timed("mixed_formats_s"):
            mixed = analyse_formats(
                run.planned(), run.source, levels, holdout, accuracy.target, accuracy.view_batches
            )
        run.plan, found = mixed.narrow(run.plan, found)
        return found, mixed
    if run.candidates:
        with run.timed("method_choice_s"):
            chosen, sections["method_choice"] = choose_activation_methods(
                run.planned(), run.source, found, run.candidates, accuracy.auto_samples
            )
        found = {**found, **chosen}
    if not accuracy.layer_view and accuracy.target is None:
        return found, None
    with run.timed("layer_view_s"):
        analysis = analyse_layers(
            run.planned(), run.source, found, holdout, accuracy.target, accuracy.view_batches
        )
    run.plan, found = analysis.narrow(run.plan, found)
    return found, analysis

"""The mixed-format search's share of a run: one recipe per listed format (checked before
anything runs), their plans over the same tensors, and every format calibrated.

The run itself is planned and calibrated at the first (cheapest) format; the other formats are
planned on the same model and calibrated on the same batches, each by its own pass.
"""

from __future__ import annotations

import dataclasses

from qcal_export.analysis.mixed_formats import Levels
from qcal_export.errors import RecipeError
from qcal_export.graphs.opset_first import converted_for_export, export_opset
from qcal_export.graphs.switchable import switch_units
from qcal_export.graphs.targets import find_targets
from qcal_export.pipeline.run import Run
from qcal_export.pipeline.scales_step import ProgressFactory, calibrate_scales
from qcal_export.spec.choices import Target
from qcal_export.spec.config import CalibrationConfig
from qcal_export.spec.formats import FORMATS
from qcal_export.spec.methods import METHODS
from qcal_export.spec.plan import Plan
from qcal_export.spec.recipe import Recipe
from qcal_export.spec.recipe_options import default_target
from qcal_export.spec.scales import TensorScales

WHERE = "formats (--formats)"


def mixed_config(config: CalibrationConfig) -> tuple[CalibrationConfig, list[Recipe]]:
    """``config`` at the first listed format and one placement for all (``--target``, else
    tensorrt where a listed format's activations run there, else ort), and each format's
    recipe; RecipeError for what cannot go with a list of formats. No list: ``config``, []."""
    formats = config.accuracy.formats
    if not formats:
        return config, []
    _refuse_options(config)
    options = config.quantization
    target = options.target or (
        Target.TENSORRT
        if any(default_target(f, options.activation_format) == Target.TENSORRT for f in formats)
        else Target.ORT
    )
    recipes = []
    for fmt in formats:
        try:
            recipes.append(dataclasses.replace(options, format=fmt, target=target).build())
        except RecipeError as e:
            raise RecipeError(f"{WHERE}: {fmt}: {e}") from None
    return config.replace(format=formats[0], target=str(target)), recipes


def _refuse_options(config: CalibrationConfig) -> None:
    """RecipeError naming the option that cannot go with a list of formats."""
    options, accuracy = config.quantization, config.accuracy
    refused = [
        (
            accuracy.target_cosine is None and accuracy.target_rel_l2 is None,
            "searches for an output-error target: give --target-cosine or --target-rel-l2",
        ),
        (options.recipe is not None, "builds each format's recipe: give no recipe (--recipe)"),
        (
            options.scales_in is not None,
            "calibrates every format listed: give no saved scales (--scales-in)",
        ),
        (
            options.weight_format is not None,
            "sets the weights' format of each node: give no --weight-format",
        ),
        (
            METHODS[options.method].searches,
            f"calibrates each format with one method: give another method than {options.method}",
        ),
        (
            options.weight_method is not None and METHODS[options.weight_method].full_hessian,
            "compares formats on the same float weights, which gptq rewrites: give another "
            "--weight-method",
        ),
        (
            config.outputs.checkpoint is not None,
            "mixes formats per node, which the serving checkpoints do not hold: "
            "give no --checkpoint",
        ),
        (
            config.state.state is not None,
            "calibrates several formats, which one state file does not hold: give no --state",
        ),
    ]
    for bad, why in refused:
        if bad:
            raise RecipeError(f"{WHERE} {why}")


def plan_levels(run: Run, formats: tuple[str, ...], recipes: list[Recipe]) -> list[Plan]:
    """Each format's plan on the run's model (``run.plan`` is the first's), the model first
    raised to the opset the most demanding needs where that rewrites ops (then all are planned
    again); RecipeError where two formats would quantize different node inputs."""
    plans = [run.plan, *(find_targets(run.loaded.proto, r) for r in recipes[1:])]
    highest = max(plans, key=lambda plan: export_opset(run.loaded.proto, plan))
    converted = converted_for_export(run.loaded.proto, highest)
    if converted is not None:
        run.loaded.proto = converted
        notes = run.plan.notes
        plans = [find_targets(converted, r) for r in recipes]
        plans[0].notes = notes
        run.plan = plans[0]
    first = _slots(plans[0])
    for fmt, plan in zip(formats[1:], plans[1:], strict=True):
        if _slots(plan) != first:
            raise RecipeError(_placement_error(formats[0], fmt, first, _slots(plan), run))
    return plans


def _slots(plan: Plan) -> set[tuple[str, int, str, str]]:
    return {
        (s.node, s.index, s.tensor, s.kind) for slots in switch_units(plan).values() for s in slots
    }


def _placement_error(first: str, fmt: str, a: set, b: set, run: Run) -> str:
    """What two formats' plans differ in (one node input), and what to do."""
    node, index, tensor, kind = min(a ^ b)
    only = first if (node, index, tensor, kind) in a else fmt
    if FORMATS[fmt].weight_only or FORMATS[first].weight_only:
        hint = "mix weight-only formats with --activation-format none (or a format for all)"
    else:
        hint = "give --target tensorrt (it places every format alike) or leave one format out"
    return (
        f"{WHERE}: {first} and {fmt} quantize different tensors under target "
        f"{run.recipe.target} ({kind} {tensor!r} of node {node!r} input {index}: {only} only); "
        f"every format of the list must place the same Q/DQ: {hint}"
    )


def calibrate_levels(
    run: Run,
    config: CalibrationConfig,
    progress: ProgressFactory | None,
    recipes: list[Recipe],
    plans: list[Plan],
    found: dict[str, TensorScales],
) -> Levels:
    """Every format's scales (the first's are ``found``, the run's own), each calibrated
    on the run's batches with its own recipe and plan."""
    scales = [found]
    for recipe, plan in zip(recipes[1:], plans[1:], strict=True):
        level = dataclasses.replace(run, plan=plan, recipe=recipe, state=None, timings={})
        scales.append(calibrate_scales(level, config, progress))
    formats = list(config.accuracy.formats or ())
    return Levels(formats, plans, scales)

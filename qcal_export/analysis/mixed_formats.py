"""Mixed-format precision search: each unit gets the cheapest format of an ordered list (float
always last) for which the held-out batches still meet a target.

Units are those of ``graphs/mixed_switch.format_units`` (planned nodes and shared-scale groups,
joined where they read one tensor). One session runs the leveled model (every unit switchable
among the formats and float), through the FP4 emulation where a format is FP4.
- Sensitivity: the per-layer view over the unit-format pairs (``sensitivity.layer_view``): each
  unit's output error alone at each format, the others float.
- Step up: from every unit at the cheapest format, the unit whose current format is the most
  sensitive (largest error alone at that format) steps up one format, until the target is met
  (float is exact, so this ends). One format at a time, not straight to float: a middle format
  often suffices, and a unit sent to float would hold the cost of float through the search.
- Step down: each unit above the cheapest format, least sensitive first (at the cheapest
  format), takes the cheapest format that keeps the target, tried cheapest first.
So every unit ends at the cheapest format that held when it was tried: no single unit could go
cheaper with the others as the search left them then.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from qcal_export.analysis.layer_view import exported_error
from qcal_export.analysis.mixed_bits import element_counts, format_rows, overall_bits
from qcal_export.analysis.planned import PlannedModel
from qcal_export.analysis.sensitivity import LayerView, SwitchedRuns, Target, layer_view
from qcal_export.capture.data import DataSource
from qcal_export.errors import DataError, RecipeError
from qcal_export.graphs.fp4_emulation import runnable_or_refuse
from qcal_export.graphs.mixed_switch import (
    LEVEL_MARK,
    format_units,
    leveled_model,
    members,
    mixed_plan,
)
from qcal_export.graphs.switchable import Slot, Switchable
from qcal_export.spec.plan import Plan
from qcal_export.spec.scales import TensorScales
from qcal_export.validation.output_error import ErrorTally

FLOAT = "float"

log = logging.getLogger(__name__)


@dataclass
class Levels:
    """The formats of a mixed search, cheapest first, each with its plan and scales (the plans
    quantize the same tensors for the same node inputs)."""

    formats: list[str]
    plans: list[Plan]
    scales: list[dict[str, TensorScales]]

    def pairs(self) -> list[tuple[Plan, dict[str, TensorScales]]]:
        return list(zip(self.plans, self.scales, strict=True))


@dataclass
class FormatChoice:
    """Each unit's level (``len(formats)``: float), the steps and the held-out error."""

    target: Target
    chosen: dict[str, int]
    steps: list[dict[str, Any]] = field(default_factory=list)
    heldout: dict[str, float] = field(default_factory=dict)


def enable_of(chosen: list[int], count: int) -> np.ndarray:
    """The leveled model's switches for units at levels ``chosen`` of ``count`` formats."""
    enable = np.zeros(len(chosen) * count, dtype=bool)
    for u, level in enumerate(chosen):
        if level < count:
            enable[u * count + level] = True
    return enable


class HeldOut:
    """The held-out batches and the float outputs on them, run once: each configuration the
    search tries then runs the batches once (``SwitchedRuns.error`` runs float beside it)."""

    def __init__(self, runs: SwitchedRuns, holdout: DataSource):
        off = np.zeros(len(runs.nodes), dtype=bool)
        self.runs = runs
        self.pairs = [(feed, runs.run(feed, off, runs.outputs)) for feed in runs.feeds(holdout)]
        if not self.pairs:
            raise DataError(
                f"{holdout.description} holds no batch: give more batches than holdout_every "
                "(--holdout-every), or a smaller holdout_every"
            )

    def error(self, enable: np.ndarray) -> dict[str, float]:
        """The worst output's error of switch setting ``enable`` over the held-out batches."""
        tally = ErrorTally(self.runs.outputs)
        for feed, references in self.pairs:
            tally.add(references, self.runs.run(feed, enable, self.runs.outputs))
        return tally.worst()


def search_formats(
    runs: SwitchedRuns,
    view: LayerView,
    holdout: DataSource,
    target: Target,
    units: list[str],
    formats: list[str],
) -> FormatChoice:
    """The cheapest format per unit meeting ``target`` on the held-out batches (the module's
    greedy: one format up at a time by sensitivity, then each down, least sensitive first)."""
    count = len(formats)
    levels = [0] * len(units)
    names = [*formats, FLOAT]
    held_out = HeldOut(runs, holdout)

    def loss(u: int, level: int) -> float:
        return target.loss(view.alone[f"{units[u]}{LEVEL_MARK}{formats[level]}"])

    def error() -> dict[str, float]:
        return held_out.error(enable_of(levels, count))

    def step(change: str, reached: dict[str, float]) -> None:
        choice.steps.append({"change": change, **reached})
        log.info("mixed formats: %s (%s %.6g)", change, target.metric, reached[target.metric])

    current = error()
    choice = FormatChoice(target, {})
    step(f"all {formats[0]}", current)
    while not target.met(current):
        u = max(
            (u for u in range(len(units)) if levels[u] < count), key=lambda u: loss(u, levels[u])
        )
        levels[u] += 1
        current = error()
        step(f"{units[u]} up to {names[levels[u]]}", current)
    for u in sorted(range(len(units)), key=lambda u: loss(u, 0)):
        kept = levels[u]
        for level in range(kept):
            levels[u] = level
            trial = error()
            if target.met(trial):
                current = trial
                step(f"{units[u]} down to {names[level]}", trial)
                break
        else:
            levels[u] = kept
    choice.chosen = dict(zip(units, levels, strict=True))
    choice.heldout = current
    return choice


@dataclass
class MixedAnalysis:
    """What the mixed search found: the view over unit-format pairs, the units (their slots
    and the switchable units each joins), the levels and the choice."""

    view: LayerView
    units: dict[str, list[Slot]]
    joined: dict[str, list[str]]
    levels: Levels
    choice: FormatChoice
    counts: dict[str, tuple[int, int]]

    def narrow(
        self, plan: Plan, found: dict[str, TensorScales]
    ) -> tuple[Plan, dict[str, TensorScales]]:
        """The plan giving every unit its chosen format, and the scales it uses."""
        return mixed_plan(self.levels.pairs(), self.joined, self.choice.chosen)

    def report(
        self, planned: PlannedModel, exported: onnx.ModelProto, holdout: DataSource | None
    ) -> dict[str, Any]:
        """The report's ``mixed_formats`` section (``planned``: the model as exported)."""
        names = [*self.levels.formats, FLOAT]
        rows = format_rows(self.units, self.joined, self.choice.chosen, names, self.view)
        bits = overall_bits(self.levels.plans, self.units, self.choice.chosen, self.counts)
        section: dict[str, Any] = {
            "formats": names,
            "target": {"metric": self.choice.target.metric, "value": self.choice.target.value},
            "units": rows,
            "bits": bits,
            "steps": self.choice.steps,
            "heldout_switchable": self.choice.heldout,
        }
        if holdout is not None:
            section["heldout_exported"] = exported_error(
                planned.path, planned.providers, exported, holdout
            )
        return {"mixed_formats": section}


def leveled_runs(planned: PlannedModel, levels: Levels) -> tuple[SwitchedRuns, dict]:
    """A session over the leveled form of the planned model, and its units."""
    units = format_units(levels.plans[0])
    recipe = planned.recipe
    leveled = leveled_model(
        planned.model,
        levels.pairs(),
        units,
        recipe.weights_mode,
        recipe.nvfp4_form,
        levels.formats,
    )
    runnable = runnable_or_refuse(
        leveled.model,
        "the mixed-format search runs in ONNX Runtime, and this model's quantized forms hold "
        "what it cannot run",
    )
    switchable = Switchable(runnable, leveled.units)
    runs = SwitchedRuns(switchable, planned.providers, f"the mixed form of {planned.path}")
    return runs, units


def analyse_formats(
    planned: PlannedModel,
    source: DataSource | None,
    levels: Levels,
    holdout: DataSource | None,
    target: Target,
    batches: int,
) -> MixedAnalysis:
    """Sensitivity of every unit at every format on the first ``batches`` batches of
    ``source``, then the cheapest format per unit meeting ``target`` on ``holdout``."""
    if source is None or holdout is None:
        raise RecipeError("the mixed-format search needs data: pass --data")
    runs, units = leveled_runs(planned, levels)
    view = layer_view(runs, source, batches)
    choice = search_formats(runs, view, holdout, target, list(units), levels.formats)
    counts = element_counts(planned, levels.plans[0], source)
    joined = members(levels.plans[0], units)
    return MixedAnalysis(view, units, joined, levels, choice, counts)

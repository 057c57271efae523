"""What a run does beyond calibrating (``calibrate_onnx``'s accuracy options): the hold-out
split and smoothing before calibration, then method ``auto``'s choice, the per-layer view and
the precision search for a target."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qcal_export.artifacts.scales import TensorScales
from qcal_export.capture.data import DataSource, check_count, split_holdout
from qcal_export.errors import RecipeError
from qcal_export.layer_analysis import Analysis, analyse_layers, choose_activation_methods
from qcal_export.sensitivity import Target
from qcal_export.smoothing import smooth_run

if TYPE_CHECKING:
    from qcal_export.run import Run


@dataclass(frozen=True)
class Accuracy:
    """What a run does beyond calibrating: smoothing first, the method choice (``auto``), the
    per-layer view and the precision search for a target."""

    layer_view: bool = False
    target: Target | None = None
    holdout_every: int = 5
    view_batches: int = 4
    smooth: float | None = None

    def __post_init__(self) -> None:
        check_count("holdout_every (--holdout-every)", self.holdout_every, 2)
        check_count("view_batches (--view-batches)", self.view_batches, 1)
        if self.smooth is not None and not _number_in(self.smooth, 0, 1, closed=False):
            raise RecipeError(
                f"smooth (the SmoothQuant alpha) must be a number in (0, 1), not {self.smooth!r}"
            )

    def check(self, scales_in: object) -> None:
        """Refuse what cannot go together, before anything runs."""
        if self.smooth is not None and scales_in is not None:
            raise RecipeError(
                "smooth recomputes the smoothing factors from the data, which saved scales do "
                "not follow: calibrate again instead of passing scales_in (--scales-in)"
            )


def prepare(
    run: Run, accuracy: Accuracy, max_batches: int | None
) -> tuple[DataSource | None, dict[str, Any]]:
    """Hold out every ``holdout_every``-th batch for a target, and smooth the model if asked;
    returns the held-out batches and the report's ``smoothing`` section."""
    holdout = None
    if accuracy.target is not None and run.source is not None:
        run.source, holdout = split_holdout(run.source, accuracy.holdout_every)
    sections: dict[str, Any] = {}
    if accuracy.smooth is not None:
        with run.timed("smooth_s"):
            notes = smooth_run(run, accuracy.smooth, max_batches)
        sections["smoothing"] = {"alpha": accuracy.smooth, "notes": notes}
    return holdout, sections


def refine(
    run: Run,
    found: dict[str, TensorScales],
    accuracy: Accuracy,
    holdout: DataSource | None,
    sections: dict[str, Any],
) -> tuple[dict[str, TensorScales], Analysis | None]:
    """Method ``auto``'s choice, then the per-layer view and the target's float nodes: the
    scales to export (``run.plan`` narrowed to them) and the analysis, if any."""
    if run.candidates:
        with run.timed("method_choice_s"):
            chosen, sections["method_choice"] = choose_activation_methods(
                run, found, accuracy.view_batches
            )
        found = {**found, **chosen}
    if not accuracy.layer_view and accuracy.target is None:
        return found, None
    with run.timed("layer_view_s"):
        analysis = analyse_layers(run, found, holdout, accuracy.target, accuracy.view_batches)
    return analysis.narrow(run, found), analysis


def target_from(cosine: float | None, rel_l2: float | None) -> Target | None:
    """The output-error target of ``calibrate_onnx``'s two options (at most one given)."""
    if cosine is not None and rel_l2 is not None:
        raise RecipeError("give one output-error target: target_cosine or target_rel_l2")
    if cosine is not None and not _number_in(cosine, 0, 1, closed=True):
        raise RecipeError(f"target_cosine={cosine!r} is out of range: it must be in (0, 1]")
    if rel_l2 is not None and not _number_in(rel_l2, 0, math.inf, closed=False):
        raise RecipeError(f"target_rel_l2={rel_l2!r} is out of range: it must be finite and > 0")
    if cosine is not None:
        return Target("cosine", cosine)
    return None if rel_l2 is None else Target("rel_l2", rel_l2)


def _number_in(value: object, low: float, high: float, *, closed: bool) -> bool:
    """A real number (not a bool) in ``(low, high]`` where ``closed``, else ``(low, high)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return low < value <= high if closed else low < value < high

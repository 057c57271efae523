"""What a run does beyond calibrating (``calibrate_onnx``'s accuracy options), checked before
anything runs, and the hold-out split of the data (for validation and targets)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from qcal_export.analysis.sensitivity import Target
from qcal_export.capture.data import DataSource, check_count, open_data, split_holdout
from qcal_export.errors import RecipeError
from qcal_export.validation.data import ValidationData, held_out_or_first


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

    @property
    def one_process(self) -> bool:
        """Whether a step runs that works in one process only (not across ranks yet)."""
        return self.layer_view or self.target is not None or self.smooth is not None

    def check(self, scales_in: object) -> None:
        """Refuse what cannot go together, before anything runs."""
        if self.smooth is not None and scales_in is not None:
            raise RecipeError(
                "smooth recomputes the smoothing factors from the data, which saved scales do "
                "not follow: calibrate again instead of passing scales_in (--scales-in)"
            )


class Split(NamedTuple):
    """The held-out batches for a target (None without one), the validation batches (None:
    nothing validates), whether the data was split (every ``holdout_every``-th batch) and the
    batches left to calibrate on (the data itself where it was not split)."""

    holdout: DataSource | None
    validation: ValidationData | None
    split: bool
    calibration: DataSource | None


def split_data(
    source: DataSource | None,
    accuracy: Accuracy,
    *,
    validate: int,
    validate_data: Any,
    batch_size: int | None,
    scales_in: object,
) -> Split:
    """Hold out every ``holdout_every``-th batch of ``source`` (the data) from calibration, for
    a target and for validation, before the data is shared among processes.

    Validation runs on the first ``validate`` batches of ``validate_data`` where given, else
    of the held-out batches; where the data has fewer than ``holdout_every`` batches none is
    held out, and validation runs on the calibration batches (``ValidationData.kind`` says so,
    once a pass has run). None where nothing validates (``validate`` 0, no data).
    """
    extra = open_data(validate_data, batch_size=batch_size) if validate_data is not None else None
    holdout = None
    wanted = accuracy.target is not None or (validate and extra is None and scales_in is None)
    split = wanted and source is not None
    calibration = source
    if split:
        calibration, holdout = split_holdout(source, accuracy.holdout_every)
    target = holdout if accuracy.target is not None else None
    if not validate:
        return Split(target, None, split, calibration)
    if extra is not None:
        path = str(validate_data) if isinstance(validate_data, (str, Path)) else ""
        data = ValidationData(extra, "validate-data", path=path)
    elif calibration is None:
        return Split(target, None, split, calibration)
    elif scales_in is not None:
        data = ValidationData(calibration, "scales-in")
    else:
        data = ValidationData(None, "held out", accuracy.holdout_every)
        data.source = held_out_or_first(source, accuracy.holdout_every, validate, data)
    return Split(target, data, split, calibration)


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

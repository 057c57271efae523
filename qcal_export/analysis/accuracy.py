"""What a run does beyond calibrating (``calibrate_onnx``'s accuracy options), checked before
anything runs, and the hold-out split of the data (for validation and targets)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from qcal_export.analysis.sensitivity import Target
from qcal_export.capture.data import DataSource, open_data, split_holdout
from qcal_export.spec.checks import check_accuracy, check_smooth_scales, check_targets
from qcal_export.spec.recipe import Recipe
from qcal_export.validation.data import ValidationData, held_out_or_first


@dataclass(frozen=True)
class Accuracy:
    """What a run does beyond calibrating: smoothing first, the method choice (``auto``), the
    per-layer view and the precision search for a target (among ``formats``, cheapest first,
    each with its recipe, where given)."""

    layer_view: bool = False
    target: Target | None = None
    holdout_every: int = 5
    view_batches: int = 4
    smooth: float | None = None
    auto_samples: int = 4
    formats: tuple[str, ...] = ()
    format_recipes: tuple[Recipe, ...] = ()

    def __post_init__(self) -> None:
        check_accuracy(self.holdout_every, self.view_batches, self.smooth, self.auto_samples)

    @property
    def one_process(self) -> bool:
        """Whether a step runs that works in one process only (not across ranks yet)."""
        return self.layer_view or self.target is not None or self.smooth is not None

    def check(self, scales_in: object) -> None:
        """Refuse what cannot go together, before anything runs."""
        check_smooth_scales(self.smooth, scales_in)


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
    check_targets(cosine, rel_l2)
    if cosine is not None:
        return Target("cosine", cosine)
    return None if rel_l2 is None else Target("rel_l2", rel_l2)

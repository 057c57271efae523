"""The checks of a run's options that need nothing but the values: counts, the verdict's
threshold, the accuracy options and output-error targets. The config runs them on construction;
the stages that take the same values run them too, with the same messages."""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection

from qcal_export.errors import DataError, RecipeError

MIN_COSINE = 0.99
"""Default ``min_cosine``. Per-tensor int8 and fp8 models that keep their accuracy land above
0.995 on their outputs; a drop to 0.99 is where top-1 or character agreement starts to move, and
a collapse (clipped attention, a saturated layer) lands far below it."""


def check_count(name: str, value: object, minimum: int, *, optional: bool = False) -> None:
    """RecipeError unless ``value`` is an integer >= ``minimum`` (or None where ``optional``):
    the batch options (``batch_size``, ``max_batches``, ...) checked before anything runs."""
    if value is None and optional:
        return
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not integral or value < minimum:
        raise RecipeError(f"{name} must be an integer >= {minimum}, not {value!r}")


def check_min_cosine(value: object) -> float:
    """``value`` as a float in (0, 1]; RecipeError naming the option otherwise."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (real and 0 < value <= 1):
        raise RecipeError(f"min_cosine (--min-cosine) must be a number in (0, 1], not {value!r}")
    return float(value)


def check_accuracy(
    holdout_every: object, view_batches: object, smooth: object, auto_samples: object = 1
) -> None:
    """RecipeError for a hold-out period below 2, a view of no batch, method auto scoring on
    no sample or an alpha outside (0, 1)."""
    check_count("holdout_every (--holdout-every)", holdout_every, 2)
    check_count("view_batches (--view-batches)", view_batches, 1)
    check_count("auto_samples (--auto-samples)", auto_samples, 1)
    if smooth is not None and not number_in(smooth, 0, 1, closed=False):
        raise RecipeError(
            f"smooth (the SmoothQuant alpha) must be a number in (0, 1), not {smooth!r}"
        )


def check_smooth_scales(smooth: object, scales_in: object) -> None:
    """Smoothing and saved scales cannot go together: the scales follow no new factors."""
    if smooth is not None and scales_in is not None:
        raise RecipeError(
            "smooth recomputes the smoothing factors from the data, which saved scales do "
            "not follow: calibrate again instead of passing scales_in (--scales-in)"
        )


def check_targets(cosine: object, rel_l2: object) -> None:
    """RecipeError unless at most one output-error target is given, in its range."""
    if cosine is not None and rel_l2 is not None:
        raise RecipeError("give one output-error target: target_cosine or target_rel_l2")
    if cosine is not None and not number_in(cosine, 0, 1, closed=True):
        raise RecipeError(f"target_cosine={cosine!r} is out of range: it must be in (0, 1]")
    if rel_l2 is not None and not number_in(rel_l2, 0, math.inf, closed=False):
        raise RecipeError(f"target_rel_l2={rel_l2!r} is out of range: it must be finite and > 0")


def check_formats(formats: object, known: Collection[str]) -> tuple[str, ...] | None:
    """The formats of a mixed-format search as a tuple (from a list or a comma-separated
    string), cheapest first; RecipeError for an unknown one, a duplicate or float (always
    the last level, implicitly)."""
    if formats is None:
        return None
    if isinstance(formats, str):
        formats = [part.strip() for part in formats.split(",")]
    if not isinstance(formats, list | tuple) or not all(isinstance(f, str) for f in formats):
        raise RecipeError(f"formats (--formats) must be a list of format names, not {formats!r}")
    where = f"formats (--formats) {','.join(formats)}"
    if not formats or "" in formats:
        raise RecipeError(f"{where}: name one format or more, separated by commas")
    if "float" in formats:
        raise RecipeError(f"{where}: float is always the last level; leave it out of the list")
    unknown = [f for f in formats if f not in known]
    if unknown:
        raise RecipeError(f"{where}: unknown format {unknown[0]!r}; choose among {sorted(known)}")
    repeated = sorted({f for f in formats if formats.count(f) > 1})
    if repeated:
        raise RecipeError(f"{where}: {repeated[0]} is listed twice; give each format once")
    return tuple(formats)


def check_state_every(every: object) -> None:
    """DataError unless the state is saved every N >= 1 batches."""
    if not isinstance(every, int) or every < 1:
        raise DataError(
            f"state_every (--state-every) must be a positive number of batches, not {every!r}"
        )


def number_in(value: object, low: float, high: float, *, closed: bool) -> bool:
    """A real number (not a bool) in ``(low, high]`` where ``closed``, else ``(low, high)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return low < value <= high if closed else low < value < high

"""Method options: the values an option admits (``Bound``), the limits behind them, and the
rules that span several options of one method.

``spec.methods`` declares which method takes which option with which bound; a recipe's options
are checked there when its TensorSpec is built, so a recipe file, the API and the CLI refuse a
NaN, an infinity or a value whose time or memory is absurd before any batch runs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from qcal_export.errors import RecipeError

MAX_CANDIDATES = 1000
"""Most amax candidates an mse or shrink-mse search may score (defaults: 38 and 20). Every batch
scores every candidate, and mse keeps float64 losses ``[groups, candidates]``: 8 KB per group."""
MAX_MULTIPLIER = 1000.0
"""Largest mse multiplier (``start``, ``stop``, ``step``): candidates ``amax0 * m`` stay finite
in float32 for any ``amax0`` below 3e35."""
MAX_BINS = 2**16
"""Most histogram bins each side of zero (default 2048). A bin is then at most 2**-15 of the range
(bin widths are powers of two, 1 to 2 times range / bins), far below int8's 1/127 step, and the
histogram takes ``2 * bins`` int64 counts: 1 MiB per group."""
ENTROPY_MAX_BINS = 4999
"""The entropy calibrator's own limit (its ``MAX_BINS``: smoothing must never empty a bin)."""
MAX_NORM = 16.0
"""Largest shrink-mse error exponent: ``|e| ** norm`` stays finite in float64 for ``|e| < 1e19``."""


@dataclass(frozen=True)
class Bound:
    """A number in ``[low, high]``, or ``(low, high]`` with ``open_low``; an integer if
    ``integer``. Booleans are numbers only where ``flag`` (then 0/1 and True/False)."""

    low: float
    high: float
    open_low: bool = False
    integer: bool = False
    flag: bool = False

    def admits(self, value: object) -> bool:
        if isinstance(value, bool):
            return self.flag
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            return False
        above = value > self.low if self.open_low else value >= self.low
        return above and value <= self.high and (not self.integer or float(value).is_integer())

    def describe(self) -> str:
        if self.flag:
            return "true or false"
        kind = "an integer" if self.integer else "a finite number"
        if self.high == math.inf:
            return f"{kind} {'>' if self.open_low else '>='} {self.low:g}"
        return f"{kind} in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}]"


FRACTION = Bound(0, 1, open_low=True)
MULTIPLIER = Bound(0, MAX_MULTIPLIER, open_low=True)


def check_mse(values: Mapping[str, float]) -> None:
    """RecipeError for mse multipliers ``start..stop`` by ``step`` that run backwards or give
    more than ``MAX_CANDIDATES`` candidates."""
    start, stop, step = values["start"], values["stop"], values["step"]
    if stop < start:
        raise RecipeError(f"mse options need start <= stop, not start={start}, stop={stop}")
    steps = (stop - start) / step
    if not steps < MAX_CANDIDATES or math.ceil(round(steps, 9)) + 1 > MAX_CANDIDATES:
        raise RecipeError(
            f"mse options start={start}, stop={stop}, step={step} give more than "
            f"{MAX_CANDIDATES} candidates: raise step or narrow start..stop"
        )


def check_shrink_mse(values: Mapping[str, float]) -> None:
    """RecipeError unless ``int(maxshrink * grid)`` is 1 to ``MAX_CANDIDATES`` candidates."""
    product = values["maxshrink"] * values["grid"]
    if not 1 <= product < MAX_CANDIDATES + 1:
        raise RecipeError(
            f"shrink-mse options maxshrink={values['maxshrink']}, grid={values['grid']} give "
            f"int(maxshrink * grid) candidates: that must be 1 to {MAX_CANDIDATES}"
        )


def check_entropy(values: Mapping[str, float]) -> None:
    """RecipeError for a ``quantized_bins`` wider than the ``2 * bins`` window it merges."""
    if values.get("quantized_bins", 0) > 2 * values["bins"]:
        raise RecipeError(
            f"entropy option quantized_bins={values['quantized_bins']} is out of range: a window "
            f"of at most 2 * bins = {2 * values['bins']} bins is merged into quantized_bins"
        )

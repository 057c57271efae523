"""Method options: the keys each calibration method takes and the values each key allows.

A recipe's options are checked here when its TensorSpec is built, so a recipe file, the API and
the CLI refuse a NaN, an infinity or a value whose time or memory is absurd before any batch runs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from qcal_export.errors import RecipeError

AUTO_METHODS = ("max", "mse", "percentile", "entropy")
"""What ``auto`` chooses among, per activation, by its consumers' output error."""
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
DEFAULTS: dict[str, dict[str, float]] = {
    "mse": {"start": 0.25, "stop": 4.0, "step": 0.1},
    "shrink-mse": {"maxshrink": 0.2, "grid": 100},
    "entropy": {"bins": 2048, "max_clipped": 1e-3},
}
"""The calibrators' defaults that the checks across options need (tests compare them); entropy's
``quantized_bins`` defaults to ``min(256, 2 * bins)``."""


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


_FRACTION = Bound(0, 1, open_low=True)
OPTION_BOUNDS: dict[str, dict[str, Bound]] = {
    "mse": {key: Bound(0, MAX_MULTIPLIER, open_low=True) for key in ("start", "stop", "step")},
    "nvfp4-mse": {"hessian": Bound(0, 1, integer=True, flag=True)},
    "shrink-mse": {
        "maxshrink": _FRACTION,
        "grid": Bound(0, math.inf, open_low=True),
        "norm": Bound(0, MAX_NORM, open_low=True),
        "patience": Bound(1, math.inf, integer=True),
        "averaging_constant": _FRACTION,
    },
    "percentile": {
        "percentile": Bound(0, 100, open_low=True),
        "bins": Bound(2, MAX_BINS, integer=True),
    },
    "entropy": {
        "bins": Bound(2, ENTROPY_MAX_BINS, integer=True),
        "quantized_bins": Bound(2, 2 * ENTROPY_MAX_BINS, integer=True),
        "max_clipped": _FRACTION,
    },
}
"""Each method's options and the values each allows (the calibrators' constructors say what
they mean); ``check_method_options`` adds the rules across options."""
METHOD_OPTIONS: dict[str, set[str]] = {method: set(b) for method, b in OPTION_BOUNDS.items()}
METHOD_OPTIONS["auto"] = set().union(*(METHOD_OPTIONS.get(m, set()) for m in AUTO_METHODS))


def check_method_options(method: str, options: object) -> None:
    """RecipeError naming the option, its value and what is allowed, for any option ``method``
    does not take or whose value (alone, or with the others) is out of range."""
    if not isinstance(options, Mapping):
        raise RecipeError(f"options must be a mapping of option: number, not {options!r}")
    allowed = METHOD_OPTIONS.get(method, set())
    unknown = [key for key in options if key not in allowed]
    if unknown:
        raise RecipeError(
            f"method {method!r} takes no option(s) {sorted(map(str, unknown))}; "
            f"it takes {sorted(allowed) or 'none'}"
        )
    for name in AUTO_METHODS if method == "auto" else (method,):
        taken = {k: v for k, v in options.items() if k in OPTION_BOUNDS.get(name, {})}
        for key, value in taken.items():
            bound = OPTION_BOUNDS[name][key]
            if not bound.admits(value):
                raise RecipeError(
                    f"method {name!r} option {key}={value!r} is out of range: it must be "
                    f"{bound.describe()}"
                )
        _check_together(name, {**DEFAULTS.get(name, {}), **taken})


def _check_together(method: str, values: Mapping[str, float]) -> None:
    """The rules that span options: candidate counts and the entropy windows."""
    if method == "mse":
        start, stop, step = values["start"], values["stop"], values["step"]
        if stop < start:
            raise RecipeError(f"mse options need start <= stop, not start={start}, stop={stop}")
        steps = (stop - start) / step
        if not steps < MAX_CANDIDATES or math.ceil(round(steps, 9)) + 1 > MAX_CANDIDATES:
            raise RecipeError(
                f"mse options start={start}, stop={stop}, step={step} give more than "
                f"{MAX_CANDIDATES} candidates: raise step or narrow start..stop"
            )
    if method == "shrink-mse":
        product = values["maxshrink"] * values["grid"]
        if not 1 <= product < MAX_CANDIDATES + 1:
            raise RecipeError(
                f"shrink-mse options maxshrink={values['maxshrink']}, grid={values['grid']} give "
                f"int(maxshrink * grid) candidates: that must be 1 to {MAX_CANDIDATES}"
            )
    if method == "entropy" and values.get("quantized_bins", 0) > 2 * values["bins"]:
        raise RecipeError(
            f"entropy option quantized_bins={values['quantized_bins']} is out of range: a window "
            f"of at most 2 * bins = {2 * values['bins']} bins is merged into quantized_bins"
        )

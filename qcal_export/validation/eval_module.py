"""A task metric from the user's own Python file (``--eval-module file.py:function``), run on the
validation batches beside the output cosine: top-1 agreement, IoU, character accuracy, ...

The function takes ``(float_outputs, quantized_outputs)``, each ``{output name: ndarray}`` of one
batch, and returns a number or ``{name: number}``. Each value is averaged over the batches,
weighted by the batch size (the first input's leading dimension, 1 for a scalar input): a metric
that is a mean over a batch's samples gives the mean over all samples.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcal_export.errors import RecipeError
from qcal_export.files.user_code import describe_error, load_function, parse_spec

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Metric:
    """The function ``function`` of the Python file ``path``."""

    path: Path
    function: str
    call: Callable[[Outputs, Outputs], Any]

    @property
    def name(self) -> str:
        return f"{self.path}:{self.function}"


def load_metric(spec: str) -> Metric:
    """Import ``file.py:function``; RecipeError naming the file and function when the file is
    missing, fails to import, or has no callable of that name."""
    path, function = parse_spec(spec, "--eval-module", "metric.py:top1")
    call = load_function(path, function, "metric module", "--eval-module", RecipeError)
    return Metric(path, function, call)


def evaluate(metric: Metric, batches: Iterable[tuple[Outputs, Outputs, int]]) -> dict[str, float]:
    """The metric's values averaged over ``batches`` (float outputs, quantized outputs, batch
    size), weighted by batch size; RecipeError naming the function when it raises or returns
    something other than finite numbers."""
    sums: dict[str, float] = {}
    total = 0
    for index, (floats, quantized, size) in enumerate(batches):
        try:
            value = metric.call(floats, quantized)
        except Exception as e:
            reason = describe_error(e)
            raise RecipeError(
                f"--eval-module {metric.name} raised on validation batch {index}: {reason}"
            ) from None
        values = _values(metric, value)
        if sums and values.keys() != sums.keys():
            raise RecipeError(
                f"--eval-module {metric.name} returned keys {sorted(values)} on validation batch "
                f"{index}, {sorted(sums)} before: return the same keys for every batch"
            )
        for key, number in values.items():
            sums[key] = sums.get(key, 0.0) + number * size
        total += size
    return {key: value / total for key, value in sums.items()} if total else {}


def batch_size(feed: Mapping[str, np.ndarray]) -> int:
    """The leading dimension of a batch's first input (1 for a scalar)."""
    first = np.asarray(next(iter(feed.values())))
    return int(first.shape[0]) if first.ndim else 1


def _values(metric: Metric, value: Any) -> dict[str, float]:
    """``value`` as ``{name: finite float}`` (a bare number is named after the function)."""
    named = value if isinstance(value, Mapping) else {metric.function: value}
    out = {}
    for key, number in named.items():
        if isinstance(number, np.generic):
            number = number.item()
        real = isinstance(number, numbers.Real) and not isinstance(number, bool)
        if not isinstance(key, str) or not real or not math.isfinite(number):
            raise RecipeError(
                f"--eval-module {metric.name} returned {value!r}: it must return a finite "
                "number or a dict of name: finite number"
            )
        out[key] = float(number)
    return out

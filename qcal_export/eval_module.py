"""A task metric from the user's own Python file (``--eval-module file.py:function``), run on the
validation batches beside the output cosine: top-1 agreement, IoU, character accuracy, ...

The function takes ``(float_outputs, quantized_outputs)``, each ``{output name: ndarray}`` of one
batch, and returns a number or ``{name: number}``. Each value is averaged over the batches,
weighted by the batch size (the first input's leading dimension, 1 for a scalar input): a metric
that is a mean over a batch's samples gives the mean over all samples.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcal_export.errors import RecipeError

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
    path_text, _, function = str(spec).rpartition(":")
    if not path_text or not function.isidentifier():
        raise RecipeError(
            f"--eval-module {spec!r} is not FILE.py:FUNCTION (a Python file, a colon and the "
            "name of its metric function)"
        )
    path = Path(path_text)
    if not path.is_file():
        raise RecipeError(f"--eval-module {spec}: there is no file {path}")
    module_name = f"qcal_eval_{abs(hash(str(path.resolve())))}"
    where = importlib.util.spec_from_file_location(module_name, path)
    if where is None or where.loader is None:
        raise RecipeError(f"--eval-module {spec}: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(where)
    sys.modules[module_name] = module
    try:
        where.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(module_name, None)
        raise RecipeError(f"--eval-module {spec}: importing {path} failed: {_reason(e)}") from None
    call = getattr(module, function, None)
    if not callable(call):
        raise RecipeError(f"--eval-module {spec}: {path} has no function {function!r}")
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
            raise RecipeError(
                f"--eval-module {metric.name} raised on validation batch {index}: {_reason(e)}"
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


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__

"""Random batches that match the model's inputs, for speed-only runs: scales calibrated on them
mean nothing for accuracy, and the run says so (a warning, a report note).

Float inputs are standard normal; integer and bool inputs are ones (a valid index into any
embedding table of two rows or more, and a full attention mask). Batch ``i`` is drawn from a
generator seeded with (``seed``, ``i``), so every pass sees the same batches.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from qcal_export.capture.source import DataSource, InputSpec, Keep, Pairs
from qcal_export.errors import DataError, RecipeError

log = logging.getLogger(__name__)

RANDOM = "random"
"""The ``data`` (``--data random``) that asks for random batches."""

NO_ACCURACY = (
    "random data (--data random): for speed only; the scales and the output error mean nothing "
    "for accuracy"
)


@dataclass(frozen=True)
class RandomOptions:
    """``input_shapes``: dims per input name where the model leaves some symbolic (dim 0, the
    batch, otherwise defaults to ``--batch-size`` or 1); ``batches`` per pass; ``seed``."""

    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    batches: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name, dims in self.input_shapes.items():
            if not dims or any(isinstance(d, bool) or int(d) < 1 for d in dims):
                raise RecipeError(
                    f"input_shapes (--input-shape) {name}={dims}: dims must be integers >= 1"
                )
        if isinstance(self.batches, bool) or int(self.batches) < 1:
            raise RecipeError(f"random data needs batches >= 1, not {self.batches!r}")


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``NAME=D0,D1,...`` (or ``NAME=D0xD1x...``) as (name, dims); RecipeError otherwise."""
    name, sep, dims = text.rpartition("=")
    try:
        values = tuple(int(d) for d in dims.replace("x", ",").split(","))
    except ValueError:
        values = ()
    if not sep or not name or not values:
        raise RecipeError(f"--input-shape {text!r} is not NAME=D0,D1,... (e.g. input_ids=1,128)")
    return name, values


def open_random(
    inputs: Sequence[InputSpec], options: RandomOptions | None, batch_size: int | None
) -> DataSource:
    """Random batches for every input of ``inputs`` (optional ones too), seeded per batch."""
    options = options or RandomOptions()
    unknown = sorted(set(options.input_shapes) - {s.name for s in inputs})
    if unknown:
        raise DataError(
            f"--input-shape names input(s) {unknown}; the model has {[s.name for s in inputs]}"
        )
    shapes = {s.name: _shape(s, options.input_shapes.get(s.name), batch_size) for s in inputs}
    log.warning("%s", NO_ACCURACY)

    def batch(index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([options.seed, index])
        return {
            s.name: (
                rng.standard_normal(shapes[s.name]).astype(s.dtype)
                if s.dtype.kind in "fc"
                else np.ones(shapes[s.name], s.dtype)
            )
            for s in inputs
        }

    def pairs(keep: Keep) -> Pairs:
        return ((i, batch(i)) for i in range(options.batches) if keep(i))

    described = ", ".join(f"{n}[{','.join(map(str, d))}]" for n, d in shapes.items())
    return DataSource(
        lambda: (b for _, b in pairs(lambda i: True)),
        f"{options.batches} random batches ({described})",
        pairs=pairs,
        synthetic=True,
    )


def _shape(spec: InputSpec, given: tuple[int, ...] | None, batch_size: int | None) -> tuple:
    if given is not None:
        if spec.dims is not None:
            clash = len(given) != len(spec.dims) or any(
                want is not None and got != want
                for got, want in zip(given, spec.dims, strict=False)
            )
            if clash:
                raise DataError(
                    f"--input-shape {spec.name}={','.join(map(str, given))} does not fit the "
                    f"model's input {spec.describe()}"
                )
        return tuple(int(d) for d in given)
    if spec.dims is None:
        raise DataError(
            f"random data: input {spec.describe()} has no known rank: pass --input-shape "
            f"{spec.name}=D0,D1,..."
        )
    dims = list(spec.dims)
    if dims and dims[0] is None:
        dims[0] = batch_size or 1
    if None in dims:
        example = ",".join("N" if d is None else str(d) for d in dims)
        raise DataError(
            f"random data: input {spec.describe()} has symbolic dims: pass --input-shape "
            f"{spec.name}={example} with N a size"
        )
    return tuple(dims)

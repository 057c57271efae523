"""The stream vocabulary of calibration data: a model input's spec, a batch, and the
re-iterable ``DataSource`` (with selections of its batches) that every reader produces."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype and dims (None where symbolic or unknown); an
    ``optional`` one (type ``optional(tensor(...))``) may be left out of a batch."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...] | None
    optional: bool = False

    def describe(self) -> str:
        return f"{self.name} {self.dtype}[{self.shape_text()}]"

    def shape_text(self) -> str:
        """The dims as ``?, 3, 8, 8``: ``?`` where symbolic, or alone for an unknown rank."""
        if self.dims is None:
            return "?"
        return ", ".join("?" if d is None else str(d) for d in self.dims)


Keep = Callable[[int], bool]
Pairs = Iterator[tuple[int, Any]]


class DataSource:
    """A re-iterable stream of batches; ``batches()`` starts a new pass each call.

    ``pairs(keep)`` passes over ``(i, batch)`` for the batches ``i`` with ``keep(i)`` only,
    calling ``keep`` once per index in order; a source that can reach a batch without reading
    the ones before it (a directory of files) gives ``pairs`` and reads only those. A selection
    (``select_batches``) numbers its batches as its source does, so errors name the batch of the
    data the user gave. ``synthetic``: random batches, which say nothing of accuracy.
    """

    def __init__(
        self,
        make_iter: Callable[[], Iterator[Any]],
        description: str,
        pairs: Callable[[Keep], Pairs] | None = None,
        synthetic: bool = False,
    ):
        self._make_iter = make_iter
        self._pairs = pairs
        self.description = description
        self.synthetic = synthetic

    def batches(self) -> Iterator[Any]:
        return self._make_iter()

    def pairs(self, keep: Keep = lambda index: True) -> Pairs:
        if self._pairs is not None:
            return self._pairs(keep)
        return ((index, item) for index, item in enumerate(self.batches()) if keep(index))


def select_batches(source: DataSource, keep: Keep, description: str) -> DataSource:
    """The batches ``i`` of ``source`` with ``keep(i)``: the same ones on every pass. A
    directory's other files are never read; selections of selections compose."""

    def pairs(more: Keep) -> Pairs:
        kept = itertools.count()  # the index among the kept batches, where ``more`` applies
        return source.pairs(lambda index: keep(index) and more(next(kept)))

    return DataSource(
        lambda: (item for _, item in source.pairs(keep)),
        f"{source.description} ({description})",
        pairs=pairs,
        synthetic=source.synthetic,
    )

"""What the readers of images, texts and random data share: the batch size a model takes, and
a list of items cut into numbered batches that name their items in errors."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from qcal_export.capture.source import DataSource, InputSpec, Keep, Pairs
from qcal_export.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
"""Samples per batch where neither ``--batch-size`` nor the model's fixed batch dim says."""

Item = TypeVar("Item")


def batch_size_for(specs: Sequence[InputSpec], batch_size: int | None) -> int:
    """``batch_size``, else the inputs' fixed batch dim, else DEFAULT_BATCH_SIZE; DataError when
    ``batch_size`` differs from a fixed batch dim (dim 0) of the model."""
    fixed = {s.dims[0] for s in specs if s.dims and s.dims[0] is not None}
    if len(fixed) > 1:
        raise DataError(f"the model's inputs fix different batch sizes {sorted(fixed)}")
    if fixed:
        (want,) = fixed
        if batch_size is not None and batch_size != want:
            names = [s.name for s in specs]
            raise DataError(
                f"--batch-size {batch_size}, but the model's input(s) {names} take batches of "
                f"{want} (dim 0 is fixed): pass --batch-size {want}"
            )
        return want
    return DEFAULT_BATCH_SIZE if batch_size is None else batch_size


def numbered_batches(
    items: Sequence[Item],
    size: int,
    make: Callable[[int, Sequence[Item]], Any],
    description: str,
    *,
    whole: bool = False,
) -> DataSource:
    """``items`` cut into batches of ``size`` (batch ``i`` holds items ``i*size`` on), each
    built by ``make(i, chunk)`` only when a pass reaches it and keeps it; with ``whole`` a last
    partial batch (a model whose batch dim is fixed cannot take it) is left out, with a log line.
    """
    count = len(items) // size if whole else -(-len(items) // size)
    if whole and len(items) % size:
        log.warning(
            "%s: the last %d item(s) do not fill a batch of %d (the model's fixed batch size) "
            "and are left out",
            description,
            len(items) % size,
            size,
        )
    if count == 0:
        raise DataError(f"{description}: fewer items ({len(items)}) than one batch of {size}")

    def pairs(keep: Keep) -> Pairs:
        for index in range(count):
            if keep(index):
                yield index, make(index, items[index * size : (index + 1) * size])

    return DataSource(lambda: (b for _, b in pairs(lambda i: True)), description, pairs=pairs)


def span(names: Sequence[str]) -> str:
    """``a.png..h.png`` for a batch's first and last item (one name where it holds one)."""
    return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"

"""The batches a QDQ model is validated on: held out of the calibration data, another data set,
or (too few to hold out) the calibration batches, and where each came from."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from qcal_export.capture.data import DataSource


@dataclass
class ValidationData:
    """The batches the QDQ model is validated on, and where they come from (``kind``): "held
    out" of the data (never calibrated on), "validate-data" (another file or directory),
    "calibration" (too few batches to hold one out), "scales-in" (the data of a run that
    calibrates nothing) or "uncalibrated" (too few to hold out, but no capture pass ran: the
    activations' scales come from the graph, or the weights alone are quantized). ``seen``:
    the batch indices a validation pass read."""

    source: DataSource | None
    kind: str
    every: int = 0
    path: str = ""
    seen: list[int] = field(default_factory=list)

    @property
    def held_out(self) -> bool:
        """Whether the validation batches are kept apart from the calibration batches."""
        return self.kind in ("held out", "validate-data", "uncalibrated")

    def recorded(self, limit: int) -> DataSource:
        """The first ``limit`` batches of ``source``, recording in ``seen`` the index of each
        batch a pass reads."""
        source = self.source
        assert source is not None

        def pairs(keep: Any = lambda index: True) -> Iterator[tuple[int, Any]]:
            for index, item in itertools.islice(source.pairs(keep), limit):
                self.seen.append(index)
                yield index, item

        return DataSource(lambda: (item for _, item in pairs()), source.description, pairs=pairs)

    def describe(self) -> str:
        """Which batches: ``held out: every 5th batch (2 batches: 4, 9)``, say."""
        seen = sorted(set(self.seen))
        count = f"{len(seen)} batch{'es' if len(seen) != 1 else ''}"
        span = ", ".join(map(str, seen[:8])) + (", ..." if len(seen) > 8 else "")
        if self.kind == "held out":
            return f"held out: every {ordinal(self.every)} batch ({count}: {span})"
        if self.kind == "validate-data":
            return f"--validate-data {self.path or '(data given in memory)'} ({count})"
        where = f"batches {seen[0]}-{seen[-1]}" if len(seen) > 1 else f"batch {span or 'none'}"
        if self.kind == "scales-in":
            return f"{where} of the data ({count}; the scales come from --scales-in)"
        if self.kind == "uncalibrated":
            return f"{where} of the data ({count}; no activation was calibrated on the data)"
        return (
            f"calibration {where} ({count}; too few to hold out: fewer than {self.every} batches)"
        )


def held_out_or_first(
    source: DataSource, every: int, first: int, data: ValidationData
) -> DataSource:
    """The held-out batches of ``source`` (``i % every == every - 1``), or, where it has none,
    its first ``first`` batches (``data.kind`` set to "calibration"), in one pass: those are
    kept aside until a held-out batch shows up."""
    held = lambda index: index % every == every - 1  # noqa: E731

    def pairs(keep: Any = lambda index: True) -> Iterator[tuple[int, Any]]:
        early: list[tuple[int, Any]] = []
        found = False
        for index, item in source.pairs(lambda i: held(i) or i < min(first, every - 1)):
            if held(index):
                found, early = True, []
                if keep(index):
                    yield index, item
            else:
                early.append((index, item))
        data.kind = "held out" if found else "calibration"
        yield from ((index, item) for index, item in early if keep(index))

    return DataSource(
        lambda: (item for _, item in pairs()),
        f"{source.description} (every {ordinal(every)} batch, held out)",
        pairs=pairs,
    )


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"

"""Calibration batches from the user's own code: ``file.py:function`` (``--data-module``),
whose function, called with no argument, returns an iterable of ``{input_name: array}`` feeds
(or a callable that returns a fresh one per pass).

The file is loaded by path (``importlib``), not imported by module name; every failure (no
file, no such function, an exception inside it, while called or while iterated) is a DataError
naming the file and the function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcal_export.capture.source import DataSource
from qcal_export.errors import DataError, QcalError
from qcal_export.files.user_code import describe_error, load_function, parse_spec


@dataclass(frozen=True)
class DataModule:
    """``function`` of the Python file ``path``: it gives the feeds."""

    path: Path
    function: str

    @classmethod
    def parse(cls, text: str) -> DataModule:
        """``FILE.py:FUNCTION`` as a DataModule; RecipeError when it has no such form."""
        return cls(*parse_spec(text, "--data-module", "calib_data.py:batches"))

    @property
    def name(self) -> str:
        return f"{self.path}:{self.function}"

    def files_read(self) -> list[tuple[str, Path]]:
        return [("the data module (--data-module)", self.path)]

    def open(self) -> DataSource:
        """A DataSource over the function's feeds; the function is called once, now."""
        produce = self._load()
        made = self._guarded(produce, "when called")
        if callable(made) and not isinstance(made, Iterable):
            return DataSource(
                lambda: self._iterate(self._guarded(made, "in the callable it returned")), self.name
            )
        if not isinstance(made, Iterable):
            raise DataError(
                f"{self.name} returned a {type(made).__name__}: return an iterable of "
                "{input_name: array} dicts, or a callable that returns one per pass"
            )
        if iter(made) is made:
            used: list[bool] = []

            def once() -> Iterator[Any]:
                if used:
                    raise DataError(
                        f"{self.name} returned a one-shot iterator but a second pass over the "
                        "data is needed: return a list, or a function that makes the iterator"
                    )
                used.append(True)
                return self._iterate(made)

            return DataSource(once, self.name)
        return DataSource(lambda: self._iterate(made), self.name)

    def _load(self) -> Callable[[], Any]:
        return load_function(self.path, self.function, "data module", "--data-module", DataError)

    def _guarded(self, function: Callable[[], Any], doing: str) -> Any:
        try:
            return function()
        except QcalError:
            raise
        except Exception as e:
            raise DataError(
                f"data module {self.name} raised {describe_error(e)} ({doing})"
            ) from None

    def _iterate(self, feeds: Iterable[Any]) -> Iterator[Any]:
        """``feeds`` item by item, an exception raised inside them as a DataError."""
        iterator = iter(feeds)
        index = 0
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except QcalError:
                raise
            except Exception as e:
                raise DataError(
                    f"data module {self.name} raised {describe_error(e)} (making batch {index})"
                ) from None
            yield item
            index += 1

"""Calibration batches from the user's own code: ``file.py:function`` (``--data-module``),
whose function, called with no argument, returns an iterable of ``{input_name: array}`` feeds
(or a callable that returns a fresh one per pass).

The file is loaded by path (``importlib``), not imported by module name; every failure (no
file, no such function, an exception inside it, while called or while iterated) is a DataError
naming the file and the function.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcal_export.capture.source import DataSource
from qcal_export.errors import DataError, QcalError, RecipeError


@dataclass(frozen=True)
class DataModule:
    """``function`` of the Python file ``path``: it gives the feeds."""

    path: Path
    function: str

    @classmethod
    def parse(cls, text: str) -> DataModule:
        """``FILE.py:FUNCTION`` as a DataModule; RecipeError when it has no such form."""
        path, sep, function = str(text).rpartition(":")
        if not sep or not path or not function.isidentifier():
            raise RecipeError(
                f"--data-module {text!r} is not FILE.py:FUNCTION (e.g. calib_data.py:batches)"
            )
        return cls(Path(path), function)

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
        if not self.path.is_file():
            raise DataError(f"data module {self.path} (--data-module {self.name}) does not exist")
        spec = importlib.util.spec_from_file_location(f"_qcal_data_{self.path.stem}", self.path)
        if spec is None or spec.loader is None:
            raise DataError(f"data module {self.path}: not a Python file (--data-module)")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses and pickle look their module up there
        sys.path.insert(0, str(self.path.resolve().parent))
        try:
            spec.loader.exec_module(module)
        except QcalError:
            raise
        except (Exception, SystemExit) as e:
            del sys.modules[spec.name]
            raise DataError(f"data module {self.path} failed to load: {_reason(e)}") from None
        finally:
            sys.path.remove(str(self.path.resolve().parent))
        function = getattr(module, self.function, None)
        if not callable(function):
            raise DataError(
                f"data module {self.path} has no function {self.function!r} (--data-module "
                f"{self.name})"
            )
        return function

    def _guarded(self, function: Callable[[], Any], doing: str) -> Any:
        try:
            return function()
        except QcalError:
            raise
        except Exception as e:
            raise DataError(f"data module {self.name} raised {_reason(e)} ({doing})") from None

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
                    f"data module {self.name} raised {_reason(e)} (making batch {index})"
                ) from None
            yield item
            index += 1


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__

"""Functions from the user's own Python files, named ``FILE.py:FUNCTION`` (``--data-module``,
``--eval-module``): parsed, imported and described the same way, every fault naming the file,
the function and the option."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qcal_export.errors import QcalError, RecipeError


def parse_spec(text: str, option: str, example: str) -> tuple[Path, str]:
    """``FILE.py:FUNCTION`` as (path, function name); RecipeError naming ``option`` otherwise."""
    path, sep, function = str(text).rpartition(":")
    if not sep or not path or not function.isidentifier():
        raise RecipeError(f"{option} {text!r} is not FILE.py:FUNCTION (e.g. {example})")
    return Path(path), function


def load_function(
    path: Path, function: str, what: str, option: str, error: type[QcalError]
) -> Callable[..., Any]:
    """The callable ``function`` of the Python file ``path``, imported with its folder on
    ``sys.path`` (it may import its neighbours); ``error`` naming ``what`` (e.g. "data
    module"), the file and ``option`` when the file is missing, fails to import (a
    ``SystemExit`` included) or has no such callable."""
    spec_text = f"{option} {path}:{function}"
    if not path.is_file():
        raise error(f"{what} {path} ({spec_text}) does not exist")
    name = f"_qcal_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise error(f"{what} {path}: not a Python file ({spec_text})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickle look their module up there
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except QcalError:
        raise
    except (Exception, SystemExit) as e:
        del sys.modules[name]
        raise error(f"{what} {path} failed to load: {describe_error(e)}") from None
    finally:
        sys.path.remove(folder)
    found = getattr(module, function, None)
    if not callable(found):
        raise error(f"{what} {path} has no function {function!r} ({spec_text})")
    return found


def describe_error(error: BaseException) -> str:
    """``Type: message`` on one line (the message cut at 200 characters), or the type alone."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__

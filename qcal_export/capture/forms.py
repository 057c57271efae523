"""Which reader takes the data: images, texts, random data or a data module, by the form of
``data`` and the options given; None leaves it to data.py's own readers (.npz/.npy, iterables).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

from qcal_export.capture.data_module import DataModule
from qcal_export.capture.images import IMAGE_SUFFIXES, ImageOptions, open_images
from qcal_export.capture.random_data import RANDOM, RandomOptions, open_random
from qcal_export.capture.source import DataSource, InputSpec
from qcal_export.capture.texts import TEXT_SUFFIXES, TextOptions, open_texts
from qcal_export.errors import DataError

DataOptions = Union[ImageOptions, TextOptions, RandomOptions]  # noqa: UP007
"""How images, texts or random data become the model's inputs."""

ARRAY_SUFFIXES = (".npz", ".npy")

FORMS = {ImageOptions: "images", TextOptions: "texts", RandomOptions: "random data"}


def open_form(
    data: Any,
    batch_size: int | None,
    options: DataOptions | None,
    inputs: Callable[[], list[InputSpec]],
) -> DataSource | None:
    """``data`` as one of the forms users have, or None for data.py's readers (DataError when
    ``options`` were given for those: they apply to none of them)."""
    form = _form(data, options)
    if form is None:
        if options is not None:
            raise DataError(
                f"{FORMS[type(options)]} options were given (--input-size/--mean/--tokenizer/"
                f"--input-shape ...), but the data ({_named(data)}) holds no {FORMS[type(options)]}"
            )
        return None
    if options is not None and FORMS[type(options)] != form:
        raise DataError(
            f"{FORMS[type(options)]} options were given, but the data ({_named(data)}) is {form}"
        )
    if form == "data module":
        return data.open()
    if form == "random data":
        return open_random(inputs(), options, batch_size)
    if form == "texts":
        if options is None:
            raise DataError(
                f"{data} holds texts: pass --tokenizer DIR (a local Hugging Face tokenizer) to "
                "tokenize them"
            )
        return open_texts(Path(data), options, inputs(), batch_size)
    return open_images(Path(data), options or ImageOptions(), inputs(), batch_size)


def _form(data: Any, options: DataOptions | None) -> str | None:
    """The form ``data`` has: a data module, random data, images, texts, or None."""
    if isinstance(data, DataModule):
        return "data module"
    if isinstance(data, str) and data == RANDOM:
        return "random data"
    if not isinstance(data, (str, Path)):
        return None
    path = Path(data)
    if isinstance(options, TextOptions) and (path.is_dir() or path.suffix not in ARRAY_SUFFIXES):
        return "texts"
    if path.is_dir():
        suffixes = {p.suffix.lower() for p in path.iterdir()}
        if isinstance(options, ImageOptions) or not suffixes & set(ARRAY_SUFFIXES):
            if suffixes & set(IMAGE_SUFFIXES):
                return "images"
            if suffixes & set(TEXT_SUFFIXES):
                return "texts"
        return None
    return "texts" if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES else None


def _named(data: Any) -> str:
    return str(data) if isinstance(data, (str, Path)) else f"a {type(data).__name__}"

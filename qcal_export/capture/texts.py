"""Calibration batches from text: a text file (one text per non-empty line) or a directory of
``.txt`` files (one text each), tokenized with a local Hugging Face tokenizer directory.

Each batch is padded to its longest text (to the input's length where the model fixes it) and
truncated to ``max_length``; it feeds the inputs the model has of ``input_ids``,
``attention_mask`` and ``token_type_ids``, in the model's integer dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcal_export.capture.batching import batch_size_for, numbered_batches, span
from qcal_export.capture.source import DataSource, InputSpec
from qcal_export.errors import DataError, RecipeError

log = logging.getLogger(__name__)

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TEXT_SUFFIXES = (".txt",)
DEFAULT_MAX_LENGTH = 512


@dataclass(frozen=True)
class TextOptions:
    """``tokenizer``: a local tokenizer directory (tokenizer.json, tokenizer_config.json, ...)
    read with ``transformers.AutoTokenizer``; ``max_length``: tokens per text (None: the
    input's fixed length, else the tokenizer's limit up to DEFAULT_MAX_LENGTH)."""

    tokenizer: str | Path
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.max_length is not None and (
            isinstance(self.max_length, bool) or int(self.max_length) < 2
        ):
            raise RecipeError(f"max_length (--max-length) must be >= 2, not {self.max_length!r}")

    def files_read(self) -> list[tuple[str, Path]]:
        directory = Path(self.tokenizer)
        if not directory.is_dir():
            return []
        what = f"a file of the tokenizer {directory} (--tokenizer)"
        return [(what, f) for f in sorted(directory.iterdir()) if f.is_file()]


def load_tokenizer(directory: str | Path) -> Any:
    """The tokenizer in ``directory`` (nothing downloaded); DataError when there is none."""
    path = Path(directory)
    if not path.is_dir():
        raise DataError(f"tokenizer directory {path} (--tokenizer) does not exist")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(
            "text data needs the transformers package: pip install transformers"
        ) from None
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... by file
        text = " ".join(str(e).split())[:300] or type(e).__name__
        raise DataError(
            f"cannot load a tokenizer from {path} (--tokenizer): {text}; give a directory "
            "saved by save_pretrained (tokenizer.json or vocab files, tokenizer_config.json)"
        ) from None


def text_inputs(inputs: Sequence[InputSpec], where: str) -> list[InputSpec]:
    """The model's text inputs; DataError when one it needs is none a tokenizer gives, or one
    is no integer tensor."""
    others = [s.name for s in inputs if s.name not in TEXT_INPUTS and not s.optional]
    if others or not any(s.name == "input_ids" for s in inputs):
        raise DataError(
            f"texts in {where} feed {list(TEXT_INPUTS)}, but the model has inputs "
            f"{[s.describe() for s in inputs]}: give .npz batches or --data-module"
        )
    chosen = [s for s in inputs if s.name in TEXT_INPUTS]
    for spec in chosen:
        if spec.dtype.kind not in "iu" or (spec.dims is not None and len(spec.dims) != 2):
            raise DataError(
                f"texts in {where}: input {spec.describe()} is not an integer [batch, sequence] "
                "tensor: give .npz batches or --data-module"
            )
    return chosen


def open_texts(
    path: Path, options: TextOptions, inputs: Sequence[InputSpec], batch_size: int | None
) -> DataSource:
    """The texts of ``path`` (a file, or a directory of .txt files) as tokenized batches."""
    specs = text_inputs(inputs, str(path))
    tokenizer = load_tokenizer(options.tokenizer)
    fixed = {s.dims[1] for s in specs if s.dims is not None and s.dims[1] is not None}
    if len(fixed) > 1:
        raise DataError(f"the model's text inputs fix different lengths {sorted(fixed)}")
    length = options.max_length or next(iter(fixed), None)
    if length is None:
        length = min(int(getattr(tokenizer, "model_max_length", 0) or 0), DEFAULT_MAX_LENGTH)
        length = length if length >= 2 else DEFAULT_MAX_LENGTH
    if fixed and length != next(iter(fixed)):
        raise DataError(
            f"--max-length {length}, but the model's text inputs take sequences of "
            f"{next(iter(fixed))} (dim 1 is fixed)"
        )
    items, label = _text_items(path)
    size = batch_size_for(specs, batch_size)
    whole = any(s.dims is not None and s.dims[0] is not None for s in specs)

    def make(index: int, chunk: Sequence[TextItem]) -> dict[str, np.ndarray]:
        where = f"batch {index} ({label(chunk)})"
        encoded = tokenizer(
            [_read_text(item, where) for item in chunk],
            padding="max_length" if fixed else "longest",
            truncation=True,
            max_length=length,
            return_token_type_ids="token_type_ids" in {s.name for s in specs},
            return_tensors="np",
        )
        return {s.name: np.asarray(encoded[s.name]).astype(s.dtype) for s in specs}

    return numbered_batches(
        items, size, make, f"{len(items)} texts in {path} (max {length} tokens)", whole=whole
    )


TextItem = tuple[Path, int, int, int]
"""Where a text is: its file, start and end byte (end -1: the whole file), and line number."""


def _text_items(path: Path) -> tuple[list[TextItem], Callable[[Sequence[TextItem]], str]]:
    """Where each text is, and how a batch of them is named in errors."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"data directory {path} holds no .txt files")
        return [
            (f, 0, -1, 1) for f in files
        ], lambda chunk: f"files {span([item[0].name for item in chunk])}"
    if not path.is_file():
        raise DataError(f"text file {path} (--data) does not exist or is not a regular file")
    items = []
    try:
        with open(path, "rb") as stream:
            start = 0
            for number, line in enumerate(stream, 1):
                if line.strip():
                    items.append((path, start, start + len(line), number))
                start += len(line)
    except OSError as e:
        raise DataError(f"cannot read text file {path}: {e.strerror or e}") from None
    if not items:
        raise DataError(f"text file {path} holds no text (one text per non-empty line)")
    return items, lambda chunk: f"lines {chunk[0][3]}..{chunk[-1][3]} of {path.name}"


def _read_text(item: TextItem, where: str) -> str:
    path, start, end, _ = item
    try:
        with open(path, "rb") as stream:
            stream.seek(start)
            raw = stream.read() if end < 0 else stream.read(end - start)
        return raw.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: cannot read text from {path}: {e}") from None

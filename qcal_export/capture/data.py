"""Calibration data readers and the check of each batch against the model's inputs.

Sources: a ``.npz`` file (one batch, or ``batch_size`` samples at a time along axis 0), a
directory of ``.npz`` files (one batch each) or of ``.npy`` files (single-input models), a
Python iterable of ``{input_name: array}`` dicts, a callable returning such an iterable, and
ONNX Runtime ``CalibrationDataReader`` objects (rewound with ``rewind()`` between passes).
The forms users have (images, texts, random data, a data module) have readers of their own
(images.py, texts.py, random_data.py, data_module.py; chosen by forms.py).
"""

from __future__ import annotations

import logging
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from qcal_export.capture.source import Batch, DataSource, InputSpec, select_batches
from qcal_export.errors import DataError, ModelError
from qcal_export.spec.checks import check_count as check_count

log = logging.getLogger(__name__)


def model_inputs(model: onnx.ModelProto, name: str = "the model") -> list[InputSpec]:
    """The graph inputs to feed (initializers listed as inputs excluded); ModelError for an
    input that is no tensor (a sequence, a map), which no batch of arrays can give."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        kind = value.type.WhichOneof("value")
        optional = kind == "optional_type" and value.type.optional_type.elem_type.HasField(
            "tensor_type"
        )
        if kind != "tensor_type" and not optional:
            raise ModelError(
                f"{name}: input {value.name!r} is a {type_string(value.type)}; calibration feeds "
                "tensors (or optional tensors) only: export the model with tensor inputs"
            )
        tensor_type = (
            value.type.optional_type.elem_type.tensor_type if optional else value.type.tensor_type
        )
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        dims = None
        if tensor_type.HasField("shape"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
            )
        specs.append(InputSpec(value.name, dtype, dims, optional))
    return specs


def type_string(type_proto: onnx.TypeProto) -> str:
    """An ONNX type as ONNX Runtime writes it: ``tensor(float)``, ``optional(tensor(float))``,
    ``sequence(tensor(int64))``, ``map(string, tensor(float))``."""
    kind = type_proto.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        elem = getattr(type_proto, kind).elem_type
        element = helper.tensor_dtype_to_string(elem).removeprefix("TensorProto.").lower()
        return f"{kind.removesuffix('_type')}({element})"
    if kind in ("optional_type", "sequence_type"):
        return f"{kind.removesuffix('_type')}({type_string(getattr(type_proto, kind).elem_type)})"
    if kind == "map_type":
        key = helper.tensor_dtype_to_string(type_proto.map_type.key_type)
        key = key.removeprefix("TensorProto.").lower()
        return f"map({key}, {type_string(type_proto.map_type.value_type)})"
    return str(kind)


def check_batch(batch: Any, inputs: list[InputSpec], index: int) -> Batch:
    """``batch`` as a dict of contiguous arrays, or DataError naming the batch and input."""
    if not isinstance(batch, Mapping):
        raise DataError(f"batch {index} is a {type(batch).__name__}, not a dict of input arrays")
    names = {spec.name for spec in inputs}
    missing = sorted({spec.name for spec in inputs if not spec.optional} - set(batch))
    extra = sorted(set(batch) - names)
    problems = [f"missing input(s) {missing}"] if missing else []
    problems += [f"unknown input(s) {extra}"] if extra else []
    if problems:
        raise DataError(f"batch {index}: {'; '.join(problems)} (the model expects {sorted(names)})")
    checked = {}
    for spec in inputs:
        if spec.name not in batch:
            continue
        array = np.asarray(batch[spec.name])
        where = f"batch {index}, input {spec.name!r}"
        if array.dtype != spec.dtype:
            raise DataError(f"{where}: dtype {array.dtype}, the model expects {spec.dtype}")
        if spec.dims is not None:
            if array.ndim != len(spec.dims):
                raise DataError(
                    f"{where}: rank {array.ndim} (shape {array.shape}), the model expects "
                    f"{spec.describe()}"
                )
            for axis, (got, want) in enumerate(zip(array.shape, spec.dims, strict=True)):
                if want is not None and got != want:
                    raise DataError(
                        f"{where}: dim {axis} is {got}, the model expects {spec.describe()}"
                    )
        checked[spec.name] = np.require(array, requirements="C")
    return checked


def split_holdout(source: DataSource, every: int) -> tuple[DataSource, DataSource]:
    """(calibration, held-out): batch ``i`` is held out when ``i % every == every - 1``, so the
    split is the same on every pass and the held-out batches never reach a calibrator."""
    if every < 2:
        raise DataError(f"holdout_every must be at least 2 (one batch in N held out), not {every}")
    return (
        select_batches(source, lambda i: i % every != every - 1, "calibration split"),
        select_batches(
            source, lambda i: i % every == every - 1, f"every {every}th batch, held out"
        ),
    )


def open_data(
    data: Any,
    *,
    batch_size: int | None = None,
    options: Any = None,
    inputs: Callable[[], list[InputSpec]] | None = None,
) -> DataSource:
    """Wrap any supported source in a DataSource; DataError names what is unusable.

    ``options``: an ImageOptions, TextOptions or RandomOptions (forms.py) for those forms;
    ``inputs``: the model's inputs, which those forms are shaped to."""
    from qcal_export.capture.forms import open_form

    check_count("batch_size (--batch-size)", batch_size, 1, optional=True)
    if isinstance(data, DataSource):
        return data
    source = open_form(data, batch_size, options, inputs or (lambda: []))
    if source is not None:
        return source
    if isinstance(data, (str, Path)):
        return _open_path(Path(data), batch_size)
    if hasattr(data, "get_next") and callable(data.get_next):
        return _open_reader(data)
    if isinstance(data, Mapping):
        return DataSource(lambda: iter([data]), "one batch")
    if callable(data):
        return DataSource(
            lambda: iter(data()), f"batches from {getattr(data, '__name__', 'callable')}"
        )
    if isinstance(data, Iterable):
        return _open_iterable(data)
    raise DataError(
        f"cannot read calibration data from a {type(data).__name__}: give a .npz file, a "
        "directory of .npz/.npy files, an iterable of {input_name: array} dicts, or an ONNX "
        "Runtime CalibrationDataReader"
    )


def _open_iterable(data: Iterable[Any]) -> DataSource:
    if iter(data) is not data:
        return DataSource(lambda: iter(data), f"{type(data).__name__} of batches")
    used = []

    def once() -> Iterator[Any]:
        if used:
            raise DataError(
                "the calibration data is a one-shot iterator but a second pass is needed (the "
                "mse method's, or the output check's: validate_batches=0 skips that one): pass "
                "a list, a callable returning an iterator, or a reader with rewind()"
            )
        used.append(True)
        return data

    return DataSource(once, "iterator of batches")


def _open_reader(reader: Any) -> DataSource:
    passes = []

    def start() -> Iterator[Any]:
        if passes:
            if not callable(getattr(reader, "rewind", None)):
                raise DataError(
                    f"{type(reader).__name__} has no rewind() and this method needs a second "
                    "pass over the data: add rewind() to the reader"
                )
            reader.rewind()
        passes.append(True)
        return iter(reader.get_next, None)

    return DataSource(start, f"{type(reader).__name__}")


def _open_path(path: Path, batch_size: int | None) -> DataSource:
    if path.is_dir():
        files = _batch_files(path)
        if not files:
            raise DataError(
                f"data directory {path} holds no .npz/.npy batches, .png/.jpg/.jpeg images or "
                ".txt texts"
            )
        kinds = {p.suffix for p in files}
        if len(kinds) > 1:
            raise DataError(f"data directory {path} mixes .npz and .npy files: keep one kind")
        return DataSource(
            lambda: (_load_file(p) for p in files),
            f"{len(files)} files in {path}",
            pairs=lambda keep: ((i, _load_file(p)) for i, p in enumerate(files) if keep(i)),
        )
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if not path.is_file():
        raise DataError(f"data path {path} is neither a regular file nor a directory")
    if path.suffix != ".npz":
        raise DataError(
            f"data file {path} is not a .npz file, or a text file with --tokenizer (or a "
            "directory of .npz/.npy, images or .txt)"
        )
    return DataSource(lambda: _split_npz(path, batch_size), str(path))


def _batch_files(directory: Path) -> list[Path]:
    """The directory's .npz/.npy regular files in name order; anything else of those names (a
    named pipe, which would block the read, or a subdirectory) is skipped with a log line."""
    named = sorted(p for p in directory.iterdir() if p.suffix in (".npz", ".npy"))
    skipped = [p.name for p in named if not p.is_file()]
    if skipped:
        log.warning("data directory %s: skipped %s (not regular files)", directory, skipped)
    return [p for p in named if p.is_file()]


UNREADABLE = (
    OSError,
    ValueError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    tokenize.TokenError,
)
"""What numpy and zipfile raise on a damaged file: truncated, empty, bad CRC, a bad header (a
ValueError, or the TokenError of numpy's header filter), an unknown compression method
(zipfile's NotImplementedError), pickled objects (ValueError)."""


def _load_file(path: Path) -> Batch | np.ndarray:
    """One batch: a .npz as a dict, a .npy as a bare array for the model's only input. Every
    array is read here (a .npz is read lazily), so a damaged file fails as a DataError."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                loaded = {name: loaded[name] for name in loaded.files}
    except UNREADABLE as e:
        raise DataError(f"cannot read data file {path}: {_reason(e)}") from None
    except MemoryError:
        raise DataError(
            f"cannot read data file {path}: its header asks for more memory than there is "
            "(a damaged file?)"
        ) from None
    kinds = {".npz": (dict, "a .npz archive"), ".npy": (np.ndarray, "a .npy array")}
    want, named = kinds[path.suffix]
    if not isinstance(loaded, want):
        held = kinds[".npy" if path.suffix == ".npz" else ".npz"][1]
        raise DataError(f"data file {path} holds {held}, not {named} as its name says: rename it")
    return loaded


def _reason(error: Exception) -> str:
    """An exception's message in one line, with its type where the message is bare."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _split_npz(path: Path, batch_size: int | None) -> Iterator[Batch]:
    whole = _load_file(path)
    if batch_size is None:
        yield whole
        return
    scalars = sorted(name for name, a in whole.items() if a.ndim == 0)
    if scalars:
        raise DataError(f"{path}: arrays {scalars} are scalars; batch_size splits along axis 0")
    lengths = {name: len(a) for name, a in whole.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{path}: arrays differ in length along axis 0 {lengths}; cannot batch")
    total = next(iter(lengths.values()), 0)
    for start in range(0, total, batch_size):
        yield {name: a[start : start + batch_size] for name, a in whole.items()}


def feeds(
    source: DataSource, inputs: list[InputSpec], max_batches: int | None = None
) -> Iterator[Batch]:
    """The first ``max_batches`` (or all) batches of ``source``, checked against ``inputs`` and
    named in errors by their index in the data given."""
    for index, (batch, item) in enumerate(source.pairs()):
        if max_batches is not None and index >= max_batches:
            return
        yield as_feed(item, inputs, batch)


def as_feed(item: Any, inputs: list[InputSpec], index: int) -> Batch:
    """A batch item (dict, or bare array for a single-input model) checked against the inputs."""
    if isinstance(item, np.ndarray):
        if len(inputs) != 1:
            raise DataError(
                f"batch {index} is a bare array but the model has inputs "
                f"{[s.name for s in inputs]}: store batches as .npz dicts keyed by input name"
            )
        item = {inputs[0].name: item}
    return check_batch(item, inputs, index)

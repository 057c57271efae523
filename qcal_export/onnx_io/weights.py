"""Weights out of the protobuf: a model's large initializers live in a ``WeightStore``.

A loaded model's proto keeps every initializer of ``MIN_BYTES`` or more as a TensorProto with
its name, type and dims but no data: ``data_location = EXTERNAL`` and a ``location`` naming the
store and the key (``qcal-weights:<token>:<key>``). Shape inference, the checker and
serialisation then never walk the weights; ONNX Runtime gets them as external initializers
(``weight_sessions``); ``to_array`` reads any initializer, stored or embedded. Tensors in an
external data file are read from it when first used (a read-only map of the file, one per
file); embedded ones are moved out of the proto on load. Arrays derived from a stored weight
(quantized, smoothed) go into the same store (``derived_tensor``), under a key naming what they
were computed from, so that a second export of the same weight with the same scales reuses it.
"""

from __future__ import annotations

import mmap
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor

from qcal_export.errors import ModelError

MIN_BYTES = 1024
"""Initializers smaller than this (shapes, scalars, axes) stay embedded in the proto."""

PREFIX = "qcal-weights"
STORED_TYPES = {
    TensorProto.FLOAT,
    TensorProto.DOUBLE,
    TensorProto.FLOAT16,
    TensorProto.BFLOAT16,
    TensorProto.INT8,
    TensorProto.UINT8,
    TensorProto.INT16,
    TensorProto.UINT16,
    TensorProto.INT32,
    TensorProto.UINT32,
    TensorProto.INT64,
    TensorProto.UINT64,
    TensorProto.BOOL,
    TensorProto.FLOAT8E4M3FN,
    TensorProto.FLOAT8E4M3FNUZ,
    TensorProto.FLOAT8E5M2,
    TensorProto.FLOAT8E5M2FNUZ,
}
"""Element types stored one element per item of a numpy dtype (4-bit and string tensors stay
embedded: ONNX Runtime takes no packed external initializer from numpy)."""

SPILL_BYTES = 1 << 20
"""Arrays a store is given of this size or more (quantized, smoothed or embedded weights) go
to its temporary file, mapped: like a model's external data, their pages can be dropped."""

_SPILLED = Path("<spilled>")
_STORES: dict[str, WeightStore] = {}
"""Every store not released, by token: a proto names its store, copies of it too."""


class WeightStore:
    """Arrays by key; those of an external data file are views of a read-only map of it,
    read (paged in) when first used; large arrays given to it are kept the same way (``put``).

    A store lives until ``release`` (a run releases its model's store when it ends): protos
    name it by its token, copies of a proto too, so none of them owns it.
    """

    def __init__(self, source: Path | None = None) -> None:
        self.source = None if source is None else source.resolve()
        """The model file the store's own keys (the initializer names) were read from."""
        self._stats = {} if source is None else {self.source: _identity(self.source)}
        self.token = secrets.token_hex(6)
        self._arrays: dict[str, np.ndarray] = {}
        self._lazy: dict[str, tuple[Path, int, int, np.dtype, tuple[int, ...]]] = {}
        self._maps: dict[Path, np.memmap] = {}
        self._spill: IO[bytes] | None = None
        self.types: dict[str, int] = {}
        _STORES[self.token] = self

    def release(self) -> None:
        """Drop the arrays and file maps; a proto naming this store can no longer be read."""
        _STORES.pop(self.token, None)
        self._arrays.clear()
        self._lazy.clear()
        self._maps.clear()
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def drop_pages(self, key: str | None = None) -> None:
        """Take the mapped file pages of ``key`` (all: None) out of this process's resident
        memory; they stay in the page cache and come back when next read, so a copy made or
        a session built from them costs its own memory only."""
        ranges = [self._lazy[key]] if key is not None and key in self._lazy else []
        if key is None:
            ranges = [(f, 0, len(m), None, None) for f, m in self._maps.items() if len(m)]
        for file, offset, length, _, _ in ranges:
            mapped = self._maps[file]._mmap  # numpy's mmap.mmap of the file
            start = offset - offset % mmap.PAGESIZE
            mapped.madvise(mmap.MADV_DONTNEED, start, offset + length - start)

    def holds(self, path: Path) -> bool:
        """Whether this store was loaded from the model file ``path`` (resolved) and neither
        it nor its data files changed since."""
        if self.source != path:
            return False
        return all(_identity(file) == stat for file, stat in self._stats.items())

    def __contains__(self, key: str) -> bool:
        return key in self._arrays or key in self._lazy

    def put(self, key: str, array: np.ndarray) -> None:
        """Keep ``array`` under ``key``: in memory under ``SPILL_BYTES``, else written to the
        store's temporary file and mapped from it (its pages can leave resident memory)."""
        array = np.ascontiguousarray(array)
        if array.nbytes < SPILL_BYTES:
            self._arrays[key] = array
            return
        if self._spill is None:
            self._spill = tempfile.TemporaryFile(prefix="qcal-weights-")  # noqa: SIM115 (closed by release)
        spill = self._spill
        end = spill.seek(0, os.SEEK_END)
        offset = end + (-end % mmap.PAGESIZE)
        spill.seek(offset)
        spill.write(array.reshape(-1).view(np.uint8).data)
        spill.flush()
        self._maps[_SPILLED] = np.memmap(spill, dtype=np.uint8, mode="r")
        self._lazy[key] = (_SPILLED, offset, array.nbytes, array.dtype, array.shape)

    def put_file(self, key: str, file: Path, offset: int, length: int, init: TensorProto) -> None:
        """``key`` reads ``length`` bytes at ``offset`` of ``file`` as ``init``'s type and dims."""
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
        dims = tuple(init.dims)
        if length != dtype.itemsize * int(np.prod(dims, dtype=np.int64)):
            raise ModelError(
                f"{file}: tensor {init.name!r} has {length} bytes of external data, its type "
                f"and dims {list(dims)} need {dtype.itemsize * int(np.prod(dims))}"
            )
        if file not in self._maps:  # mapped now: the file may be removed once loaded
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
            self._stats[file] = _identity(file)
        self._lazy[key] = (file, offset, length, dtype, dims)

    def get(self, key: str) -> np.ndarray:
        array = self._arrays.get(key)
        if array is not None:
            return array
        file, offset, length, dtype, dims = self._lazy[key]
        raw = self._maps[file][offset : offset + length]
        if offset % dtype.itemsize:  # numpy and ONNX Runtime want aligned elements
            raw = raw.copy()
        return raw.view(dtype).reshape(dims)


def _identity(file: Path) -> tuple[int, int, int] | None:
    """The file's inode, size and modification time (None once it is gone)."""
    try:
        stat = file.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def file_model(path: Path) -> onnx.ModelProto | None:
    """The light proto of the model file ``path`` over the weights of the live store loaded
    from it (no second copy of its weights); None when no store was loaded from ``path``, or
    the file or its data changed since."""
    resolved = path.resolve()
    store = next((s for s in reversed(_STORES.values()) if s.holds(resolved)), None)
    if store is None:
        return None
    proto = onnx.load(str(path), load_external_data=False)
    for init in proto.graph.initializer:
        if init.name in store:
            _point_at(init, store, init.name)
    for tensor in all_tensors(proto.graph):
        if _location(tensor) is not None and not is_stored(tensor):
            load_external_data_for_tensor(tensor, str(path.parent))
            tensor.ClearField("external_data")
            tensor.ClearField("data_location")
    return proto


def drop_pages(source: onnx.ModelProto | TensorProto) -> None:
    """``WeightStore.drop_pages`` for the tensor ``source``, or for every store the model
    ``source`` reads from."""
    if isinstance(source, TensorProto):
        found = stored_key(source)
        if found is not None:
            found[0].drop_pages(found[1])
        return
    stores = {f[0].token: f[0] for t in source.graph.initializer if (f := stored_key(t))}
    for store in stores.values():
        store.drop_pages()


def _location(init: TensorProto) -> str | None:
    if init.data_location != TensorProto.EXTERNAL:
        return None
    return next((e.value for e in init.external_data if e.key == "location"), None)


def stored_key(init: TensorProto) -> tuple[WeightStore, str] | None:
    """The store and key of ``init`` if its data is in a store; None for embedded data."""
    location = _location(init)
    if location is None or not location.startswith(PREFIX + ":"):
        return None
    _, token, key = location.split(":", 2)
    store = _STORES.get(token)
    if store is None:
        raise ModelError(
            f"initializer {init.name!r} names weight store {token}, which no longer exists "
            "(its model was released)"
        )
    return store, key


def is_stored(init: TensorProto) -> bool:
    location = _location(init)
    return location is not None and location.startswith(PREFIX + ":")


def _point_at(init: TensorProto, store: WeightStore, key: str) -> None:
    """Make ``init`` a data-less tensor whose data is ``store[key]``."""
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
        init.ClearField(field)
    init.ClearField("uint64_data")
    init.ClearField("external_data")
    init.data_location = TensorProto.EXTERNAL
    entry = init.external_data.add()
    entry.key, entry.value = "location", f"{PREFIX}:{store.token}:{key}"


def to_array(init: TensorProto) -> np.ndarray:
    """``init``'s values as ``numpy_helper.to_array`` gives them (ml_dtypes for bfloat16 and
    fp8), read from its store when it has one. Stored arrays are read-only views: copy to
    change them."""
    found = stored_key(init)
    if found is None:
        return numpy_helper.to_array(init)
    store, key = found
    return store.get(key)


def store_model(proto: onnx.ModelProto, folder: Path, store: WeightStore) -> onnx.ModelProto:
    """A new proto of ``proto`` whose main-graph initializers of ``MIN_BYTES`` or more are in
    ``store``: those with external data (files in ``folder``) read lazily from their file,
    embedded ones moved. Other tensors with external data (smaller ones, those of subgraphs
    and attributes) are read into the proto.
    ModelError when an external data file is missing or too short."""
    for init in proto.graph.initializer:
        if init.data_type not in STORED_TYPES:
            continue
        if _embedded_bytes(init) < MIN_BYTES:
            continue
        if _location(init) is not None:
            _store_external(init, folder, store)
        else:
            try:
                array = numpy_helper.to_array(init)
            except ValueError as e:  # data of another size than its dims
                raise ModelError(f"initializer {init.name!r} cannot be read ({e})") from None
            store.put(init.name, array)
            _point_at(init, store, init.name)
    for tensor in all_tensors(proto.graph):
        if _location(tensor) is not None and not is_stored(tensor):
            try:
                load_external_data_for_tensor(tensor, str(folder))
            except Exception as e:  # onnx reports a missing file as a bare ValidationError
                raise ModelError(f"cannot read its external data ({e})") from None
            tensor.ClearField("external_data")
            tensor.ClearField("data_location")
    return onnx.ModelProto.FromString(proto.SerializeToString())


def _store_external(init: TensorProto, folder: Path, store: WeightStore) -> None:
    info = {e.key: e.value for e in init.external_data}
    file = (folder / info["location"]).resolve()
    if not file.is_file():
        raise ModelError(f"cannot read its external data (no file {file})")
    offset = int(info.get("offset", 0))
    size = file.stat().st_size
    length = int(info.get("length", size - offset))
    if offset + length > size:
        raise ModelError(
            f"cannot read its external data ({file} holds {size} bytes, tensor "
            f"{init.name!r} ends at {offset + length})"
        )
    store.put_file(init.name, file, offset, length, init)
    _point_at(init, store, init.name)


def _embedded_bytes(init: TensorProto) -> int:
    """Bytes of ``init``'s data (raw, or as its type and dims say)."""
    if init.HasField("raw_data"):
        return len(init.raw_data)
    count = int(np.prod(init.dims, dtype=np.int64)) if init.dims else 1
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize


def derived_tensor(
    name: str, source: TensorProto, tag: str, make: Callable[[], TensorProto]
) -> TensorProto:
    """Initializer ``name``, the tensor ``make()`` builds from ``source`` as ``tag`` says (say
    a digest of the scales), its data in ``source``'s store where ``source`` is stored.

    There it is kept under ``<key>|<tag>``, computed once: a later call with the same tag
    (another export of the same weight with the same scales) reuses it. Elsewhere, or for a
    type a store does not hold, the tensor ``make`` built is returned as it is.
    """
    found = stored_key(source)
    if found is None:
        return make()
    store, key = found
    derived = f"{key}|{tag}"
    if derived not in store:
        tensor = make()
        if tensor.data_type not in STORED_TYPES:
            return tensor
        store.put(derived, numpy_helper.to_array(tensor))
        store.types[derived] = tensor.data_type
    tensor = TensorProto(name=name, data_type=store.types[derived], dims=store.get(derived).shape)
    _point_at(tensor, store, derived)
    return tensor


def store_embedded(model: onnx.ModelProto) -> None:
    """Move ``model``'s embedded main-graph initializers of ``MIN_BYTES`` or more into the
    store its stored initializers are in (none: the model keeps them embedded)."""
    store = next((f[0] for t in model.graph.initializer if (f := stored_key(t))), None)
    if store is None:
        return
    for init in model.graph.initializer:
        stays = init.data_type not in STORED_TYPES or is_stored(init)
        if not stays and _embedded_bytes(init) >= MIN_BYTES:
            key = f"{init.name}|{secrets.token_hex(4)}"
            store.put(key, numpy_helper.to_array(init))
            _point_at(init, store, key)


def embed(tensor: TensorProto) -> None:
    """Put ``tensor``'s stored data back into it as raw bytes (no-op when embedded)."""
    found = stored_key(tensor)
    if found is None:
        return
    array = found[0].get(found[1])
    tensor.ClearField("external_data")
    tensor.ClearField("data_location")
    tensor.raw_data = np.ascontiguousarray(array).tobytes()


def all_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Every tensor of ``graph``: initializers and attribute tensors, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                yield from all_tensors(sub)

"""Read ONNX models (with external data) and write them atomically."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError

from qcal_export.errors import ModelError
from qcal_export.files.atomic import atomic_dir, atomic_path, check_writable, fsync, write_errors
from qcal_export.onnx_io.weight_views import checker_view, stored_bytes
from qcal_export.onnx_io.weights import (
    MIN_BYTES,
    WeightStore,
    all_tensors,
    embed,
    store_model,
    stored_key,
)

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
"""A serialized ModelProto cannot exceed 2 GB: larger models must keep external data."""


def over_protobuf_limit(model: onnx.ModelProto) -> bool:
    """Whether ``model`` with its stored weights embedded would serialize past 2 GB (protobuf
    cannot even size such a message)."""
    try:
        return model.ByteSize() + stored_bytes(model) > PROTOBUF_LIMIT
    except EncodeError:
        return True


@dataclass
class LoadedModel:
    """An ONNX model read from ``path``: its graph (``proto``, large initializers without
    data), its weights (``store``, read from the files as asked), and the file's checksum."""

    proto: onnx.ModelProto
    path: Path
    sha256: str
    external_data: bool
    store: WeightStore

    @property
    def opset(self) -> int:
        return default_opset(self.proto)


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ModelError(f"model {model.graph.name!r} imports no default-domain opset")


MIN_OPSET = 7
"""The oldest default-domain opset ONNX Runtime (which captures the activations) loads."""


def check_opset(model: onnx.ModelProto, name: str) -> int:
    """The model's default-domain opset; ModelError if ONNX Runtime or onnx cannot take it."""
    opset = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise ModelError(
            f"{name} uses opset {opset}, older than {MIN_OPSET}, the oldest ONNX Runtime "
            "loads: re-export it at a newer opset (or onnx.version_converter.convert_version)"
        )
    if opset > newest:
        raise ModelError(
            f"{name} uses opset {opset}, newer than {newest}, the newest this onnx "
            f"({onnx.__version__}) knows: upgrade onnx and onnxruntime, or re-export the model"
        )
    return opset


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(path: str | Path) -> LoadedModel:
    """Load ``path``, its large initializers into a weight store (external data is read from
    its file when first asked); ModelError names the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ModelError(f"{path} is not a readable ONNX model ({e})") from None
    if not proto.graph.node:
        raise ModelError(f"{path} holds no ONNX graph (is it an ONNX model?)")
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    store = WeightStore(path)
    try:
        proto = store_model(proto, path.parent, store)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from None
    return LoadedModel(proto, path, file_sha256(path), external, store)


SAVE_STEPS: list[Callable[[str], None]] = []
"""Called with the name of each step ``save_model`` completes, in order: ``data_written``,
``model_staged``, ``data_placed``, ``model_placed``, ``old_data_removed`` (the interrupted-write
tests kill the writer at each)."""


def save_model(
    model: onnx.ModelProto,
    path: str | Path,
    *,
    external_data: bool,
    keep: Collection[Path] = (),
) -> Path:
    """Write ``model`` atomically; with ``external_data`` its tensors go to a data file of its own.

    The data file, ``<name>.<token>.data``, has a name no earlier write used: it is written in a
    temporary folder and moved beside the model, whose file is renamed into place last, so at
    every instant ``path`` is the old model with its old data or the new one with its new data.
    Only then are the old model's data files removed: those a save_model named
    (``<name>.data``, ``<name>.<token>.data``), never one in ``keep`` (the files a run reads).
    Models over 2 GB always get external data; ``model`` is left as given (when the write
    succeeds).
    """
    path = check_writable(path, "output model")
    external_data = external_data or over_protobuf_limit(model)
    old_data = _own_data_files(path)
    if old_data:
        old_data -= {Path(f).resolve() for f in keep}
    placed: Path | None = None
    try:
        with (
            atomic_path(path, "output model") as tmp,
            atomic_dir(path.parent) as staging,
            write_errors(path),
        ):
            data = _stage(model, tmp, staging, path, external_data=external_data)
            if data is not None:
                placed = path.parent / data.name
                os.replace(data, placed)
                fsync(path.parent)
                _step("data_placed")
    except BaseException:
        if placed is not None:
            placed.unlink(missing_ok=True)
        raise
    _step("model_placed")
    _remove_old_data(old_data, path)
    _step("old_data_removed")
    return path


def _stage(
    model: onnx.ModelProto, tmp: Path, staging: Path, path: Path, *, external_data: bool
) -> Path | None:
    """Write ``model`` to ``tmp`` and, with ``external_data``, its tensors of ``MIN_BYTES`` or
    more, one by one, to a data file in ``staging`` (returned); else with every tensor embedded.
    ``model`` is not changed."""
    mode = tmp.stat().st_mode & 0o777
    written = onnx.ModelProto()
    written.CopyFrom(model)
    if external_data:
        data = _write_data(written, staging, path, mode)
    else:
        data = None
        for tensor in _initializers(written.graph):
            embed(tensor)
    _step("data_written")
    with open(tmp, "wb") as f:
        f.write(written.SerializeToString())
    _step("model_staged")
    return data


def _remove_old_data(old_data: set[Path], path: Path) -> None:
    """Remove the old model's data files once the new model is in place; a file that cannot be
    removed is logged, not raised: the new model is already whole."""
    for stale in sorted(old_data):
        try:
            stale.unlink(missing_ok=True)
        except OSError as e:
            log.warning("cannot remove %s, the old data file of %s: %s", stale, path, e.strerror)


def external_data_files(path: str | Path) -> list[Path]:
    """The files the tensors of the ONNX model at ``path`` keep their data in (beside it)."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    files: list[Path] = []
    for tensor in all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if location and path.parent / location not in files:
            files.append(path.parent / location)
    return files


def _write_data(model: onnx.ModelProto, folder: Path, path: Path, mode: int) -> Path | None:
    """Move ``model``'s initializers of ``MIN_BYTES`` or more (stored, or embedded as raw
    bytes) to ``folder/<name>.<token>.data``, a name unused beside the output ``path`` too, at
    aligned offsets; None when every tensor is smaller (all inline)."""
    while True:
        data_name = f"{path.name}.{secrets.token_hex(6)}.data"
        if not (path.parent / data_name).exists():
            break
    data = folder / data_name
    with open(data, "wb") as f:
        for tensor in _initializers(model.graph):
            raw = _raw_bytes(tensor)
            if raw is None or len(raw) < MIN_BYTES:
                continue
            offset = -f.tell() % (4096 if len(raw) >= 1 << 20 else 64)
            f.write(b"\0" * offset)
            offset = f.tell()
            f.write(raw)
            _point_at_file(tensor, data_name, offset, len(raw))
    if os.path.getsize(data) == 0:
        data.unlink()
        return None
    os.chmod(data, mode)
    fsync(data)
    return data


def _raw_bytes(tensor: onnx.TensorProto) -> memoryview | bytes | None:
    """The bytes a data file holds for ``tensor``: its stored array or its raw data."""
    found = stored_key(tensor)
    if found is not None:
        array = np.ascontiguousarray(found[0].get(found[1]))
        return array.reshape(-1).view(np.uint8).data  # bytes of any dtype (ml_dtypes' fp8 too)
    if tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.HasField("raw_data"):
        return tensor.raw_data
    return None


def _point_at_file(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    tensor.ClearField("external_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """The initializers of ``graph`` and of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                yield from _initializers(sub)


def _own_data_files(path: Path) -> set[Path]:
    """The data files of the model now at ``path`` (resolved) named as save_model names them."""
    pattern = re.compile(re.escape(path.name) + r"(\.[0-9a-f]{12})?\.data")
    named = {p.resolve() for p in path.parent.iterdir() if pattern.fullmatch(p.name)}
    if not named or not path.is_file():
        return set()
    try:
        referenced = {f.resolve() for f in external_data_files(path)}
    except Exception:  # an unreadable old output: leave every file as it is
        return set()
    return named & referenced


def _step(name: str) -> None:
    for hook in SAVE_STEPS:
        hook(name)


def check_model(model: onnx.ModelProto, name: str, *, full: bool) -> None:
    """Run onnx's checker (with shape inference when ``full``); ModelError names the model.

    Stored initializers are checked as graph inputs of their type and shape (their data is in
    the store, which checked their sizes when it took them).
    """
    try:
        onnx.checker.check_model(checker_view(model), full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        raise ModelError(
            f"{name} fails onnx's checker: {reason} (fix or re-export the model)"
        ) from None

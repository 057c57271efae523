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

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import helper
from onnx.external_data_helper import convert_model_to_external_data, write_external_data_tensors

from qcal_export.errors import ModelError
from qcal_export.files.atomic import atomic_dir, atomic_path, check_writable, fsync, write_errors

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
"""A serialized ModelProto cannot exceed 2 GB: larger models must keep external data."""


def inference_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself, or past 2 GB a copy for shape inference: main-graph initializers over
    1 MiB become graph inputs of their type and shape (inference reads no weight values)."""
    if not over_protobuf_limit(model):
        return model
    graph = onnx.GraphProto(name=model.graph.name)
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    for init in model.graph.initializer:
        if len(init.raw_data) > 1 << 20:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, init.dims))
        else:
            graph.initializer.append(init)
    view = helper.make_model(graph, opset_imports=model.opset_import)
    view.ir_version = model.ir_version
    view.functions.extend(model.functions)
    return view


def over_protobuf_limit(model: onnx.ModelProto) -> bool:
    """Whether ``model`` serializes past 2 GB (protobuf cannot even size such a message)."""
    try:
        return model.ByteSize() > PROTOBUF_LIMIT
    except EncodeError:
        return True


@dataclass
class LoadedModel:
    """An ONNX model read from ``path``, its weights in memory, and the file's checksum."""

    proto: onnx.ModelProto
    path: Path
    sha256: str
    external_data: bool

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
    """Load ``path`` and its external data; ModelError names the file when it cannot be read."""
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
    if external:
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except Exception as e:  # onnx reports a missing data file as a bare ValidationError
            raise ModelError(f"{path}: cannot read its external data ({e})") from None
    return LoadedModel(proto, path, file_sha256(path), external)


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
    """Write ``model`` to ``tmp`` and, with ``external_data``, its tensors to a data file in
    ``staging`` (returned); ``model`` keeps its tensors in memory either way."""
    mode = tmp.stat().st_mode & 0o777
    data = _write_data(model, staging, path, mode) if external_data else None
    _step("data_written")
    with open(tmp, "wb") as f:
        f.write(model.SerializeToString())
    if external_data:  # the tensors went to the data file: read them back in
        onnx.load_external_data_for_model(model, str(staging))
        for tensor in _tensors(model.graph):
            tensor.ClearField("data_location")
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
    for tensor in _tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if location and path.parent / location not in files:
            files.append(path.parent / location)
    return files


def _write_data(model: onnx.ModelProto, folder: Path, path: Path, mode: int) -> Path | None:
    """Move ``model``'s tensors of 1 KiB or more to ``folder/<name>.<token>.data``, a name
    unused beside the output ``path`` too; None when every tensor is smaller (all inline)."""
    while True:
        data_name = f"{path.name}.{secrets.token_hex(6)}.data"
        if not (path.parent / data_name).exists():
            break
    convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location=data_name, size_threshold=1024
    )
    write_external_data_tensors(model, str(folder))
    data = folder / data_name
    if not data.exists():
        return None
    os.chmod(data, mode)  # onnx creates it 0600: give it the mode of every other output
    fsync(data)
    return data


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


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``graph``: initializers and attribute tensors, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                yield from _tensors(sub)


def check_model(model: onnx.ModelProto, name: str, *, full: bool, path: Path | None = None) -> None:
    """Run onnx's checker (with shape inference when ``full``); ModelError names the model.

    A model past 2 GB is checked from its file ``path`` (the checker reads its external data
    there); without one, only its graph is checked, on a weightless view.
    """
    target: onnx.ModelProto | str = model
    if over_protobuf_limit(model):
        target = str(path) if path is not None else inference_view(model)
    try:
        onnx.checker.check_model(target, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        raise ModelError(
            f"{name} fails onnx's checker: {reason} (fix or re-export the model)"
        ) from None

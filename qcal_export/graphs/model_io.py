"""Read ONNX models (with external data) and write them atomically."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import helper

from qcal_export.atomic import atomic_dir, check_writable
from qcal_export.errors import ModelError, OutputError

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


def save_model(model: onnx.ModelProto, path: str | Path, *, external_data: bool) -> Path:
    """Write ``model`` atomically; with ``external_data`` its tensors go to ``<name>.data``.

    Models over 2 GB always get external data. The model file is renamed into place last, so
    a reader never sees a model whose data file is missing or torn; ``model`` is left as given.
    """
    path = check_writable(path, "output model")
    external_data = external_data or over_protobuf_limit(model)
    with atomic_dir(path.parent) as tmp:
        staged = tmp / path.name
        data_name = f"{path.name}.data"
        try:
            onnx.save_model(
                model,
                str(staged),
                save_as_external_data=external_data,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            if external_data:
                # save_model moved the tensors out of ``model``: read them back in.
                onnx.load_external_data_for_model(model, str(tmp))
                for tensor in _tensors(model.graph):
                    tensor.ClearField("data_location")
            if (tmp / data_name).exists():
                # onnx creates the data file 0600; give it the model file's (umask) mode
                os.chmod(tmp / data_name, staged.stat().st_mode & 0o777)
                os.replace(tmp / data_name, path.parent / data_name)
            os.replace(staged, path)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e}") from None
    return path


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

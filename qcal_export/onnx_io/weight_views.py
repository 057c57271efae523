"""Whole-model views of a model whose weights are in the weight store (``weights.py``): its
stored bytes, a copy with them embedded (for tools that read weights from the proto) and the
view onnx's checker can read."""

from __future__ import annotations

import onnx
from onnx import helper

from qcal_export.onnx_io.weights import embed, is_stored, stored_key


def stored_bytes(model: onnx.ModelProto) -> int:
    """Bytes of ``model``'s stored initializers (its weights outside the proto)."""
    total = 0
    for init in model.graph.initializer:
        found = stored_key(init)
        if found is not None:
            total += found[0].get(found[1]).nbytes
    return total


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every stored initializer's data embedded (for tools that
    read weights from the proto itself: the ONNX reference evaluator)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for init in copy.graph.initializer:
        embed(init)
    return copy


def checker_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself, or, with stored initializers, a copy in which they are graph inputs
    of their type and shape (onnx's checker would look for their data in a file)."""
    if not any(is_stored(t) for t in model.graph.initializer):
        return model
    view = onnx.ModelProto()
    view.CopyFrom(model)
    inputs = {i.name for i in view.graph.input}
    kept = []
    for init in view.graph.initializer:
        if not is_stored(init):
            kept.append(init)
        elif init.name not in inputs:
            view.graph.input.append(
                helper.make_tensor_value_info(init.name, init.data_type, init.dims)
            )
    del view.graph.initializer[:]
    view.graph.initializer.extend(kept)
    return view

"""Initializers as values: look one up by name, read it as a torch tensor of its own dtype,
replace its values."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto

from qcal_export.onnx_io.weights import drop_pages, to_array


def initializer(graph: onnx.GraphProto, name: str) -> TensorProto:
    return next(t for t in graph.initializer if t.name == name)


def initializer_values(init: TensorProto) -> torch.Tensor:
    """An initializer's values (from its weight store where it is stored) as a torch tensor of
    its own dtype; bfloat16 too, which numpy holds as ml_dtypes' type that ``torch.from_numpy``
    refuses."""
    array = to_array(init)
    if init.data_type == TensorProto.BFLOAT16:
        values = torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    else:
        values = torch.from_numpy(array.copy())
    drop_pages(init)  # the copy is what is used from now on
    return values


def replace_values(init: TensorProto, values: torch.Tensor) -> None:
    """Make ``init`` hold ``values`` (its own dtype and shape) as embedded raw bytes, in place:
    its external data, or its place in a weight store, is left behind."""
    if tuple(values.shape) != tuple(init.dims):
        raise ValueError(
            f"{init.name}: values {tuple(values.shape)}, initializer {tuple(init.dims)}"
        )
    raw = values.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    for name in ("external_data", "data_location", "float_data", "int32_data", "int64_data"):
        init.ClearField(name)
    init.raw_data = raw

"""Initializers as values: look one up by name, read it as a torch tensor of its own dtype."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper


def initializer(graph: onnx.GraphProto, name: str) -> TensorProto:
    return next(t for t in graph.initializer if t.name == name)


def initializer_values(init: TensorProto) -> torch.Tensor:
    """An initializer's values as a torch tensor of its own dtype; bfloat16 too, which numpy
    holds as ml_dtypes' type that ``torch.from_numpy`` refuses."""
    array = numpy_helper.to_array(init)
    if init.data_type == TensorProto.BFLOAT16:
        return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())

"""Element types and shapes of a model's tensors after shape inference, and the float types an
ONNX QuantizeLinear takes (``FLOAT_TYPES``; why a tensor of another type gets none)."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
Shape = tuple[int | None, ...]


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type is known after shape inference."""
    return {name: elem_type for name, (elem_type, _) in tensor_infos(model).items()}


def tensor_infos(model: onnx.ModelProto) -> dict[str, tuple[int, Shape | None]]:
    """Element type and shape (None for a symbolic dim; None if the rank is unknown) of every
    tensor whose type is known after shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, ValueError):
        inferred = model
    graph = inferred.graph
    infos: dict[str, tuple[int, Shape | None]] = {
        t.name: (t.data_type, tuple(t.dims)) for t in graph.initializer
    }
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.HasField("tensor_type"):
            tensor_type = info.type.tensor_type
            shape = None
            if tensor_type.HasField("shape"):
                shape = tuple(
                    d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
                )
            infos[info.name] = (tensor_type.elem_type, shape)
    return infos


def describe_type(elem_type: int) -> str:
    """The ONNX name of ``elem_type`` (FLOAT, BFLOAT16, ...)."""
    return helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.")


def type_problem(tensor: str, elem_type: int | None) -> str:
    """Why a tensor of ``elem_type`` cannot get a QuantizeLinear."""
    if elem_type is None:
        return f"the type of {tensor!r} is unknown to shape inference"
    name = describe_type(elem_type).lower()
    reason = f"it computes in {name}: ONNX QuantizeLinear takes float, float16 or bfloat16"
    if elem_type == TensorProto.DOUBLE:
        reason += ", not double: cast the model to float32 to quantize it"
    return reason

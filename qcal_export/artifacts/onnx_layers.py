"""From an ONNX model's calibration to serving checkpoints: which initializers are linear
layers, their module names, serving orientation, biases and input scales.

A layer's name is its weight's name without ``.weight``; torch's ONNX exporter names MatMul
weights ``onnx::MatMul_<n>`` (and stores them transposed, ``[in, out]``), so for those the name
comes from the node's scope: ``/bert/encoder/layer.0/attention/self/query/MatMul`` ->
``bert.encoder.layer.0.attention.self.query``. Weights are written ``[out, in]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
import torch
from onnx import TensorProto

from qcal_export.artifacts.checkpoint import LAYOUTS, NVFP4Linear, write_nvfp4_checkpoint
from qcal_export.errors import OutputError
from qcal_export.graphs.op_inputs import WEIGHT_INPUTS
from qcal_export.onnx_io.initializers import initializer_values
from qcal_export.onnx_io.tensor_types import FLOAT_TYPES
from qcal_export.spec.formats import get_format
from qcal_export.spec.plan import Plan, WeightPlan
from qcal_export.spec.scales import TensorScales

LINEAR_OPS = ("MatMul", "Gemm")


def layer_name(weight: str, node: str) -> str:
    """The module path of a linear layer from its weight's or its node's name."""
    if weight.endswith(".weight"):
        return weight.removesuffix(".weight")
    parts = [p for p in node.split("/") if p]
    return ".".join(parts[:-1]) if len(parts) > 1 else (parts[0] if parts else weight)


def check_checkpoint_dir(directory: str | Path, layouts: Sequence[str]) -> Path:
    """OutputError for an unknown layout or a directory whose parent cannot be written."""
    unknown = [layout for layout in layouts if layout not in LAYOUTS]
    if unknown or not layouts:
        raise OutputError(f"checkpoint layout(s) {unknown or '[]'}: choose from {list(LAYOUTS)}")
    directory = Path(directory)
    parent = directory.parent if str(directory.parent) else Path(".")
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"checkpoint directory {directory} is a file: give a directory")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputError(f"checkpoint directory {directory}: {parent} is missing or not writable")
    return directory


def write_checkpoints(
    model: onnx.ModelProto,
    plan: Plan,
    scales: Mapping[str, TensorScales],
    directory: str | Path,
    layouts: Sequence[str],
) -> dict[str, Path]:
    """Write one checkpoint per layout: into ``directory`` for one layout, else into
    ``directory/<layout>``. ``model`` must still hold the float weights."""
    layers, extra, ignore = checkpoint_layers(model, plan, scales)
    directory = Path(directory)
    written = {}
    for layout in layouts:
        target = directory if len(layouts) == 1 else directory / layout
        if len(layouts) > 1:
            directory.mkdir(exist_ok=True)
        written[layout] = write_nvfp4_checkpoint(
            target, layers, layout, extra_tensors=extra, ignore=ignore
        )
    return written


def checkpoint_layers(
    model: onnx.ModelProto, plan: Plan, scales: Mapping[str, TensorScales]
) -> tuple[list[NVFP4Linear], dict[str, torch.Tensor], list[str]]:
    """(NVFP4 layers, other float parameters by name, names of linear layers left unquantized).

    Linear layers left out of NVFP4 are written in float as ``<layer>.weight`` ``[out, in]``.
    """
    initializers = {t.name: t for t in model.graph.initializer}
    layers, extra, ignore, used = [], {}, [], set()
    for node in model.graph.node:
        weight = _linear_weight(node, initializers)
        if weight is None or weight in used:
            continue
        used.add(weight)
        name = layer_name(weight, node.name)
        values = _serving_weight(node, initializer_values(initializers[weight]))
        entry, plan_entry = scales.get(weight), plan.weights.get(weight)
        if entry is None or not get_format(entry.format).two_level or plan_entry is None:
            ignore.append(name)
            extra[f"{name}.weight"] = values
            continue
        layers.append(_nvfp4_layer(name, node, values, entry, plan_entry, scales))
    for layer in layers:
        bias = initializers.get(f"{layer.name}.bias")
        layer.bias = None if bias is None else initializer_values(bias)
        used.add(f"{layer.name}.bias")
    for tensor, init in initializers.items():
        if tensor not in used and _is_parameter(init):
            extra[tensor] = initializer_values(init)
    if not layers:
        raise OutputError("no NVFP4 linear layer to write: calibrate MatMul/Gemm weights as nvfp4")
    return layers, extra, ignore


def _linear_weight(node: onnx.NodeProto, initializers: dict[str, TensorProto]) -> str | None:
    if node.op_type not in LINEAR_OPS:
        return None
    index = WEIGHT_INPUTS[node.op_type].index
    tensor = node.input[index] if len(node.input) > index else ""
    init = initializers.get(tensor)
    if init is None or len(init.dims) != 2 or init.data_type not in FLOAT_TYPES:
        return None
    return tensor


def _serving_weight(node: onnx.NodeProto, values: torch.Tensor) -> torch.Tensor:
    """``[out, in]``: MatMul ``[K, N]`` and Gemm without transB are transposed."""
    reduction = WEIGHT_INPUTS[node.op_type].reduction(node, 2)
    return values.T.contiguous() if reduction == 0 else values


def _nvfp4_layer(
    name: str,
    node: onnx.NodeProto,
    values: torch.Tensor,
    entry: TensorScales,
    weight: WeightPlan,
    scales: Mapping[str, TensorScales],
) -> NVFP4Linear:
    block_scales = entry.scale.to(torch.float8_e4m3fn)
    if weight.granularity.axis % 2 == 0:
        block_scales = block_scales.T.contiguous()
    activation = scales.get(node.input[0])
    input_scale = None
    if activation is not None and get_format(activation.format).two_level:
        input_scale = activation.global_scale.reshape(())
    return NVFP4Linear(
        name=name,
        weight=values.float(),
        block_scales=block_scales,
        global_scale=entry.global_scale.reshape(()).float(),
        input_global_scale=input_scale,
    )


def _is_parameter(init: TensorProto) -> bool:
    """Float initializers named like module parameters (``a.b.weight``), not exporter constants."""
    return init.data_type in FLOAT_TYPES and "." in init.name and "::" not in init.name

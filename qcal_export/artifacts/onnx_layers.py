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
from qcal_export.artifacts.fp8_checkpoint import FP8Linear, check_fp8_layers, write_fp8_checkpoint
from qcal_export.artifacts.mx_checkpoint import (
    MX_FORMATS,
    MXLinear,
    check_mx_layers,
    write_mx_checkpoint,
)
from qcal_export.artifacts.mx_layers import check_mx_recipe, mx_layer
from qcal_export.errors import OutputError
from qcal_export.graphs.op_inputs import WEIGHT_INPUTS
from qcal_export.onnx_io.initializers import initializer_values
from qcal_export.onnx_io.tensor_types import FLOAT_TYPES
from qcal_export.spec.choices import CheckpointLayout
from qcal_export.spec.formats import FP8_E4M3, NVFP4, get_format
from qcal_export.spec.granularity import PerAxis, PerTensor
from qcal_export.spec.plan import Plan, WeightPlan
from qcal_export.spec.recipe import Recipe
from qcal_export.spec.scales import TensorScales

LINEAR_OPS = ("MatMul", "Gemm")
NO_LAYER = (
    "no NVFP4, FP8 or MX linear layer to write: calibrate MatMul/Gemm weights as nvfp4, fp8, "
    "mxfp8 or mxfp4"
)
CHECKPOINT_FORMATS = (NVFP4.name, FP8_E4M3.name, *MX_FORMATS)
"""The weight formats a serving checkpoint holds."""
WRITERS = {
    NVFP4.name: write_nvfp4_checkpoint,
    FP8_E4M3.name: write_fp8_checkpoint,
    **dict.fromkeys(MX_FORMATS, write_mx_checkpoint),
}
CHECKS = {FP8_E4M3.name: check_fp8_layers, **dict.fromkeys(MX_FORMATS, check_mx_layers)}
"""Each format's check of its layers for a layout, run for every layout before any is written."""


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


def check_checkpoint_recipe(recipe: Recipe, layouts: Sequence[str]) -> None:
    """OutputError, before calibrating, for what ``write_checkpoints`` would refuse: no weight
    spec in a checkpoint format; or, without overrides, FP8 activations in another format, or FP8
    weights ModelOpt cannot hold (per channel, or activations left in float); MX ones likewise
    (``check_mx_recipe``)."""
    weights = [recipe.weight, *(o.weight for o in recipe.overrides)]
    formats = {spec.format for spec in weights if spec is not None}
    if not formats & set(CHECKPOINT_FORMATS):
        raise OutputError(NO_LAYER)
    check_mx_recipe(recipe, layouts)
    weight, activation = recipe.weight, recipe.activation
    if recipe.overrides or weight is None or weight.format != FP8_E4M3.name:
        return
    if activation is not None and activation.format != FP8_E4M3.name:
        raise OutputError(
            f"FP8 checkpoints hold FP8 weights with static FP8 activations or float ones, the "
            f"activations are calibrated as {activation.format}: calibrate with "
            "--activation-format fp8 (or none: weight-only)"
        )
    if CheckpointLayout.MODELOPT.value in layouts:
        if weight.per_channel:
            raise OutputError(
                "ModelOpt FP8 holds one weight scale per tensor, the weights are calibrated per "
                "output channel: calibrate with --no-per-channel-weights, or write "
                "--checkpoint-layout compressed-tensors"
            )
        if activation is None or activation.format != FP8_E4M3.name:
            raise OutputError(
                "ModelOpt FP8 quantizes activations with a static input scale: calibrate "
                "activations as fp8 (--activation-format fp8), or write --checkpoint-layout "
                "compressed-tensors (FP8 weight-only)"
            )


def write_checkpoints(
    model: onnx.ModelProto,
    plan: Plan,
    scales: Mapping[str, TensorScales],
    directory: str | Path,
    layouts: Sequence[str],
) -> dict[str, Path]:
    """Write one checkpoint per layout: into ``directory`` for one layout, else into
    ``directory/<layout>``; NVFP4, FP8 or MX, as the linear weights were calibrated. ``model``
    must still hold the float weights."""
    fmt = _checkpoint_format(model, plan, scales)
    layers, extra, ignore = checkpoint_layers(model, plan, scales, fmt)
    if fmt in CHECKS:
        for layout in layouts:  # refused before any layout is written
            CHECKS[fmt](layers, layout)
    directory = Path(directory)
    written = {}
    for layout in layouts:
        target = directory if len(layouts) == 1 else directory / layout
        if len(layouts) > 1:
            directory.mkdir(exist_ok=True)
        written[layout] = WRITERS[fmt](target, layers, layout, extra_tensors=extra, ignore=ignore)
    return written


def checkpoint_layers(
    model: onnx.ModelProto, plan: Plan, scales: Mapping[str, TensorScales], fmt: str = NVFP4.name
) -> tuple[list[NVFP4Linear | FP8Linear | MXLinear], dict[str, torch.Tensor], list[str]]:
    """(the layers whose weights are calibrated as ``fmt``; other float parameters by name;
    names of linear layers left unquantized).

    Linear layers left out are written in float as ``<layer>.weight`` ``[out, in]``. Weights are
    read one at a time from the model's weight store.
    """
    initializers = {t.name: t for t in model.graph.initializer}
    layers, extra, ignore, used = [], {}, [], set()
    for node in model.graph.node:
        weight = _linear_weight(node, initializers)
        if weight is None or weight in used:
            continue
        used.add(weight)
        name = layer_name(weight, node.name)
        values = initializer_values(initializers[weight])
        entry, plan_entry = scales.get(weight), plan.weights.get(weight)
        if plan_entry is None or entry is None or entry.format != fmt:
            ignore.append(name)
            extra[f"{name}.weight"] = _serving_weight(node, values)
        elif fmt == FP8_E4M3.name:
            layers.append(_fp8_layer(name, node, values, entry, scales))
        elif fmt in MX_FORMATS:
            layers.append(mx_layer(name, node, values, entry, scales))
        else:
            layers.append(_nvfp4_layer(name, node, values, entry, plan_entry, scales))
    for layer in layers:
        bias = initializers.get(f"{layer.name}.bias")
        layer.bias = None if bias is None else initializer_values(bias)
        used.add(f"{layer.name}.bias")
    for tensor, init in initializers.items():
        if tensor not in used and _is_parameter(init):
            extra[tensor] = initializer_values(init)
    if not layers:
        raise OutputError(NO_LAYER)
    return layers, extra, ignore


def _checkpoint_format(
    model: onnx.ModelProto, plan: Plan, scales: Mapping[str, TensorScales]
) -> str:
    """The checkpoint format of the calibrated linear weights (NVFP4 where none is in a
    checkpoint format: ``checkpoint_layers`` then finds no layer); OutputError for a calibration
    mixing two, which no serving layout holds."""
    initializers = {t.name: t for t in model.graph.initializer}
    found: dict[str, str] = {}
    for node in model.graph.node:
        weight = _linear_weight(node, initializers)
        entry = scales.get(weight) if weight in plan.weights else None
        if entry is not None and entry.format in CHECKPOINT_FORMATS:
            found.setdefault(entry.format, weight)
    if len(found) > 1:
        (a, weight_a), (b, weight_b) = list(found.items())[:2]
        raise OutputError(
            f"linear weights {weight_a!r} ({a}) and {weight_b!r} ({b}) mix formats: a serving "
            "checkpoint holds one; calibrate them in one format or --exclude the others"
        )
    return next(iter(found), NVFP4.name)


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
    values = _serving_weight(node, values).float()
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


def _fp8_layer(
    name: str,
    node: onnx.NodeProto,
    values: torch.Tensor,
    entry: TensorScales,
    scales: Mapping[str, TensorScales],
) -> FP8Linear:
    """The FP8 codes the QDQ export stores (the weight in its own dtype over the float32 scale)
    and the scales as the graph holds them (in the weight's type), in serving orientation.

    OutputError where the serving layouts cannot express the calibration: weight scales per
    block or per input channel, or an input calibrated in another format than FP8."""
    shape, gran = tuple(values.shape), entry.granularity
    output_axis = 1 - WEIGHT_INPUTS[node.op_type].reduction(node, 2)
    if isinstance(gran, PerAxis):
        if gran.axis % 2 != output_axis:
            raise OutputError(
                f"layer {name!r}: weight {entry.name!r} has FP8 scales per input channel (axis "
                f"{gran.axis}); serving checkpoints take them per output channel or per tensor"
            )
    elif not isinstance(gran, PerTensor):
        raise OutputError(
            f"layer {name!r}: weight {entry.name!r} has FP8 scales {gran.describe()}; serving "
            "checkpoints take them per output channel or per tensor (--per-channel-weights)"
        )
    codes = FP8_E4M3.quantize(values, gran.expand(entry.scale, shape), torch.zeros(()))
    codes = _serving_weight(node, codes.view(torch.uint8)).view(torch.float8_e4m3fn)
    weight_scale = entry.scale.to(values.dtype).float()
    weight_scale = (
        weight_scale.reshape(-1) if isinstance(gran, PerAxis) else weight_scale.reshape(())
    )
    activation = scales.get(node.input[0])
    input_scale = None
    if activation is not None:
        if activation.format != FP8_E4M3.name or not isinstance(activation.granularity, PerTensor):
            raise OutputError(
                f"layer {name!r}: input {activation.name!r} is calibrated as {activation.format} "
                f"{activation.granularity.describe()}; FP8 checkpoints hold static per-tensor FP8 "
                "activations: calibrate with --activation-format fp8 (or none: weight-only)"
            )
        input_scale = activation.scale.to(values.dtype).float().reshape(())
    return FP8Linear(name, codes, weight_scale, input_scale)


def _is_parameter(init: TensorProto) -> bool:
    """Float initializers named like module parameters (``a.b.weight``), not exporter constants."""
    return init.data_type in FLOAT_TYPES and "." in init.name and "::" not in init.name

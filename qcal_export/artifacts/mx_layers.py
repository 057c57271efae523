"""MX linear layers from an ONNX model's calibration (the codes and E8M0 exponents its QDQ
export stores, in serving orientation), and the checks, before calibrating, of a recipe whose
MX weights are to become a serving checkpoint."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx
import torch

from qcal_export.artifacts.mx_checkpoint import MX_FORMATS, MXLinear
from qcal_export.errors import OutputError
from qcal_export.spec.choices import CheckpointLayout
from qcal_export.spec.mx_formats import MXFP8, e8m0_codes
from qcal_export.spec.recipe import Recipe
from qcal_export.spec.scales import TensorScales


def mx_layer(
    name: str,
    node: onnx.NodeProto,
    values: torch.Tensor,
    entry: TensorScales,
    scales: Mapping[str, TensorScales],
) -> MXLinear:
    """The MX layer of weight ``values`` (graph orientation) calibrated as ``entry``: elements
    and exponents transposed to ``[out, ...]`` where the blocks run along axis 0 (MatMul's
    ``[K, N]``). OutputError where the layer's input is calibrated in another format."""
    fmt, granularity = MX_FORMATS[entry.format], entry.granularity
    expanded = granularity.expand(entry.scale, tuple(values.shape))
    codes = fmt.quantize(values.float(), expanded, None)
    exponents = e8m0_codes(entry.scale)
    if granularity.axis % 2 == 0:
        codes = codes.view(torch.uint8).T.contiguous().view(codes.dtype)
        exponents = exponents.T.contiguous()
    activation = scales.get(node.input[0])
    if activation is not None and activation.format != entry.format:
        raise OutputError(
            f"layer {name!r}: input {activation.name!r} is calibrated as {activation.format}; "
            f"{entry.format} checkpoints hold {entry.format} (dynamic) or float activations: "
            f"calibrate with --activation-format {entry.format} (or none: weight-only)"
        )
    return MXLinear(name, entry.format, codes, exponents, activation is not None)


def check_mx_recipe(recipe: Recipe, layouts: Sequence[str]) -> None:
    """OutputError, before calibrating, for MX weights (no overrides) that a layout cannot
    hold: activations in another format; ModelOpt with MXFP4, or with MXFP8 weight-only."""
    weight, activation = recipe.weight, recipe.activation
    if recipe.overrides or weight is None or weight.format not in MX_FORMATS:
        return
    if activation is not None and activation.format != weight.format:
        raise OutputError(
            f"{weight.format} checkpoints hold {weight.format} (dynamic) or float activations, "
            f"the activations are calibrated as {activation.format}: calibrate with "
            f"--activation-format {weight.format} (or none: weight-only)"
        )
    if CheckpointLayout.MODELOPT.value not in layouts:
        return
    if weight.format != MXFP8.name:
        raise OutputError(
            f"ModelOpt's HF checkpoint defines no {weight.format} layout (only MXFP8): write "
            "--checkpoint-layout compressed-tensors"
        )
    if activation is None:
        raise OutputError(
            "ModelOpt MXFP8 quantizes activations as MXFP8 too and these are left in float: "
            "calibrate with --activation-format mxfp8, or write --checkpoint-layout "
            "compressed-tensors (MXFP8A16)"
        )

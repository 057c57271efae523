"""Weight DequantizeLinear chains of block formats ONNX Runtime cannot run, folded to floats.

An FP4 weight is ``DequantizeLinear(codes, scale, axis, block_size)`` where ``codes`` is a
FLOAT4E2M1 initializer (or, with weights kept float, ``QuantizeLinear`` of a float initializer,
perhaps through a Transpose) and ``scale`` a float initializer or the two-level
``DequantizeLinear(FP8 block scales, global scale)``. Each is computed here with the format's
own numerics (spec/formats.py), in the arithmetic the reference DequantizeLinear uses: element
values in float32 times the scale repeated over its block, cast to the scale's type.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from qcal_export.onnx_io.initializers import initializer_values
from qcal_export.onnx_io.weights import to_array
from qcal_export.spec.formats import NVFP4
from qcal_export.spec.granularity import PerBlock
from qcal_export.spec.mx_formats import MXFP4, MXFP8, MXFormat

ELEMENT_FORMATS: dict[int, MXFormat] = {TensorProto.FLOAT4E2M1: MXFP4}
"""Element types ONNX Runtime cannot run, by a format that stores them: it decodes its codes
(``decode``) and rounds onto its grid (``round_elements``); NVFP4's E2M1 elements are MXFP4's."""

RUNNABLE_ELEMENTS: dict[int, MXFormat] = {TensorProto.FLOAT8E4M3FN: MXFP8}
"""Element types ONNX Runtime runs, decoded where their chain's scale is one it cannot run
(MXFP8's E4M3 elements over an E8M0 scale)."""

SCALE_TYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn,
    TensorProto.FLOAT8E8M0: torch.float8_e8m0fnu,
}
"""Block scale storage types read by their bytes: NVFP4's FP8 block scales and the MX formats'
power-of-two E8M0 scales."""

UNRUNNABLE_SCALES = frozenset({TensorProto.FLOAT8E8M0})
"""Scale types ONNX Runtime has no Q/DQ kernels for: the MX formats' E8M0 exponents."""

UNRUNNABLE_TYPES = frozenset({*ELEMENT_FORMATS, *UNRUNNABLE_SCALES})
"""Initializer types ONNX Runtime has no Q/DQ kernels for: FP4 elements and E8M0 scales."""

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


class Constants:
    """The values of a graph's constant tensors that weight chains are built from: float
    initializers, their Transposes, block scales and the DequantizeLinear of two scales."""

    def __init__(self, graph: onnx.GraphProto):
        self.inits = {t.name: t for t in graph.initializer}
        self.producers = {out: node for node in graph.node for out in node.output}

    def elem_type(self, name: str) -> int | None:
        """The ONNX element type of an initializer, else None."""
        init = self.inits.get(name)
        return None if init is None else init.data_type

    def floats(self, name: str) -> torch.Tensor | None:
        """A float initializer, or a Transpose of one; None for anything else."""
        if self.elem_type(name) in FLOAT_TYPES:
            return initializer_values(self.inits[name])
        node = self.producers.get(name)
        if node is None or node.op_type != "Transpose" or node.domain:
            return None
        source = self.floats(node.input[0])
        if source is None:
            return None
        perm = _attribute(node, "perm", None) or list(reversed(range(source.dim())))
        return source.permute(*perm).contiguous()

    def scale(self, name: str) -> torch.Tensor | None:
        """A float scale initializer, block scales stored in one of SCALE_TYPES (as float32),
        or their DequantizeLinear by a per-tensor float scale (NVFP4's two levels)."""
        plain = self.floats(name)
        if plain is not None:
            return plain
        if self.elem_type(name) in SCALE_TYPES:
            return self._block_scales(name).float()
        node = self.producers.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.domain:
            return None
        stored = self.elem_type(node.input[0])
        outer = self.floats(node.input[1])
        if stored not in SCALE_TYPES or outer is None or outer.numel() != 1 or len(node.input) > 2:
            return None
        block_scales = self._block_scales(node.input[0])
        return NVFP4.effective_scales(block_scales, outer.reshape(())).to(outer.dtype)

    def _block_scales(self, name: str) -> torch.Tensor:
        """An initializer of one of SCALE_TYPES, read by its bytes as that torch dtype."""
        init = self.inits[name]
        raw = torch.from_numpy(to_array(init).view(np.uint8).copy())
        return raw.view(SCALE_TYPES[init.data_type])


def fold_weights(graph: onnx.GraphProto) -> dict[str, torch.Tensor]:
    """The float values of every DequantizeLinear of constant codes in one of ELEMENT_FORMATS,
    by its output name; the graph is not changed (``emulate_fp4`` does that)."""
    constants = Constants(graph)
    folded = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and not node.domain and len(node.input) == 2:
            values = _dequantized(constants, node)
            if values is not None:
                folded[node.output[0]] = values
    return folded


def _dequantized(constants: Constants, node: onnx.NodeProto) -> torch.Tensor | None:
    """``node``'s output as the reference DequantizeLinear computes it, None if not constant."""
    scale = constants.scale(node.input[1])
    element = _element_values(constants, node.input[0], constants.elem_type(node.input[1]))
    if scale is None or element is None:
        return None
    expanded = expand_scale(scale, tuple(element.shape), node)
    output_type = _attribute(node, "output_dtype", 0)
    dtype = scale.dtype if not output_type else _torch_dtype(output_type)
    return (element * expanded).to(dtype)


def _element_format(elem_type: int | None, scale_type: int | None) -> MXFormat | None:
    """The format that decodes ``elem_type`` codes over a ``scale_type`` scale, if any."""
    if scale_type in UNRUNNABLE_SCALES and elem_type in RUNNABLE_ELEMENTS:
        return RUNNABLE_ELEMENTS[elem_type]
    return ELEMENT_FORMATS.get(elem_type)


def _element_values(constants: Constants, name: str, scale_type: int | None) -> torch.Tensor | None:
    """Float32 values of constant codes read with a ``scale_type`` scale: a stored initializer
    decoded, or the codes a QuantizeLinear (no zero point) writes for a constant float tensor."""
    fmt = _element_format(constants.elem_type(name), scale_type)
    if fmt is not None:
        codes = torch.from_numpy(to_array(constants.inits[name]).view(np.uint8).copy())
        return fmt.decode(codes)
    node = constants.producers.get(name)
    if node is None or node.op_type != "QuantizeLinear" or node.domain or len(node.input) != 2:
        return None
    output_type = _attribute(node, "output_dtype", None)
    fmt = _element_format(output_type, constants.elem_type(node.input[1]))
    weight, scale = constants.floats(node.input[0]), constants.scale(node.input[1])
    if fmt is None or weight is None or scale is None:
        return None
    expanded = expand_scale(scale, tuple(weight.shape), node)
    return fmt.round_elements(weight / expanded.to(weight.dtype)).float()


def expand_scale(scale: torch.Tensor, shape: tuple[int, ...], node: onnx.NodeProto) -> torch.Tensor:
    """A Q/DQ node's scale broadcast against its input of ``shape``, as ONNX reads its
    ``axis`` and ``block_size``: per tensor, per axis or repeated over each block."""
    if scale.numel() == 1 and scale.dim() <= 1:
        return scale.reshape(())
    axis = _attribute(node, "axis", 1) % len(shape)
    block_size = _attribute(node, "block_size", 0)
    if block_size:
        return PerBlock(axis, block_size).expand(scale, shape)
    return scale.reshape([-1 if i == axis else 1 for i in range(len(shape))])


def _torch_dtype(elem_type: int) -> torch.dtype:
    """The torch dtype of an ONNX float type (bfloat16 too, which numpy lacks)."""
    if elem_type == TensorProto.BFLOAT16:
        return torch.bfloat16
    return torch.from_numpy(np.zeros(0, helper.tensor_dtype_to_np_dtype(elem_type))).dtype


def _attribute(node: onnx.NodeProto, name: str, default):
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)

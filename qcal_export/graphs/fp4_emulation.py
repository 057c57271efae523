"""An ONNX Runtime-runnable copy of an FP4 QDQ model that computes exactly the same values.

ORT has no FLOAT4E2M1 kernels. Here each weight DequantizeLinear chain of FP4 codes becomes
its dequantized float initializer (graphs/fp4_weights.py), and each activation
``QuantizeLinear -> DequantizeLinear`` to FLOAT4E2M1 becomes standard float ops: ``x / scale``
(the scale repeated over its block, a partial last block and dynamic shapes included), E2M1
rounding half to even by magnitude range, saturating at 6, and ``* scale``; MX activations'
pairs over the E8M0 scales the graph computes likewise (graphs/fp4_e8m0.py). The block scales
stay as the graph computes them (QuantizeLinear to FP8 and back, which ORT runs); TensorRT's
form becomes the same standard ops (graphs/fp4_trt.py). What the emulation cannot express (an
FP4 tensor read by another op, a zero point, a global scale computed in the graph) is left as
it is: ``Emulation.unexpressed`` names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from qcal_export.errors import RecipeError
from qcal_export.graphs.fp4_e8m0 import (
    e8m0_round_trip,
    e8m0_tensors,
    e8m0_unexpressed,
    is_e8m0_pair,
    nan_propagating_amaxes,
)
from qcal_export.graphs.fp4_ops import Builder, block_expanded, round_trip
from qcal_export.graphs.fp4_trt import emulate_trt
from qcal_export.graphs.fp4_weights import ELEMENT_FORMATS, UNRUNNABLE_TYPES, fold_weights
from qcal_export.graphs.nvfp4 import TRT_DOMAIN
from qcal_export.graphs.qdq import Names
from qcal_export.onnx_io.weights import store_embedded


@dataclass
class Emulation:
    """The emulated model, and what in it ORT still cannot run (empty: all of it runs)."""

    model: onnx.ModelProto
    folded_weights: int = 0
    emulated_activations: int = 0
    unexpressed: list[str] = field(default_factory=list)


def emulate_fp4(model: onnx.ModelProto) -> Emulation:
    """A copy of ``model`` with its FP4 weight chains folded and FP4 activation Q -> DQ pairs
    replaced by float ops; ``model`` itself is not changed. Large folded weights go into the
    weight store of ``model``'s stored initializers, where it has one."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    folded = fold_weights(graph)
    _replace_by_initializers(graph, folded)
    nan_propagating_amaxes(graph, Names(graph))
    emulated = emulate_trt(graph) + _emulate_activations(graph)
    prune(graph)
    _drop_unused_trt_domain(copy)
    store_embedded(copy)
    return Emulation(copy, len(folded), emulated, unexpressed(graph))


def _drop_unused_trt_domain(model: onnx.ModelProto) -> None:
    if not any(node.domain == TRT_DOMAIN for node in model.graph.node):
        kept = [entry for entry in model.opset_import if entry.domain != TRT_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)


def runnable_form(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` itself where ONNX Runtime can run it, else its FP4 emulation where that
    expresses all of it, else None: for any pass that runs an exported model in ORT, such as a
    switchable form built over it."""
    if not unexpressed(model.graph):
        return model
    emulation = emulate_fp4(model)
    return None if emulation.unexpressed else emulation.model


def runnable_or_refuse(model: onnx.ModelProto, refusal: str) -> onnx.ModelProto:
    """``runnable_form(model)``, or RecipeError ``"{refusal}: <what ORT cannot run>"``."""
    runnable = runnable_form(model)
    if runnable is None:
        raise RecipeError(f"{refusal}: {', '.join(unexpressed(model.graph))}")
    return runnable


def unexpressed(graph: onnx.GraphProto) -> list[str]:
    """Initializers and nodes of ``graph`` that ORT cannot run: an FP4 type, an E8M0 scale
    (stored, or computed and read by a Q/DQ) or TensorRT's op."""
    left = [f"initializer {t.name!r}" for t in graph.initializer if t.data_type in UNRUNNABLE_TYPES]
    for node in graph.node:
        if node.domain == TRT_DOMAIN:
            left.append(f"{node.domain}::{node.op_type} node {node.name!r}")
        elif _output_dtype(node) in ELEMENT_FORMATS:
            left.append(f"{node.op_type} node {node.name!r}")
    return list(dict.fromkeys([*left, *e8m0_unexpressed(graph)]))


def _replace_by_initializers(graph: onnx.GraphProto, values: dict[str, torch.Tensor]) -> None:
    """Drop the nodes writing ``values``' names and add those values as initializers."""
    if not values:
        return
    kept = [node for node in graph.node if node.output[0] not in values]
    del graph.node[:]
    graph.node.extend(kept)
    for name, tensor in values.items():
        graph.initializer.append(numpy_helper.from_array(_numpy(tensor), name))


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A torch tensor as numpy (bfloat16 through ml_dtypes' type, which numpy_helper writes)."""
    if tensor.dtype == torch.bfloat16:
        bfloat16 = helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)
        return tensor.view(torch.uint16).numpy().view(bfloat16)
    return tensor.numpy()


def _output_dtype(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "output_dtype"), None)


def _emulate_activations(graph: onnx.GraphProto) -> int:
    """Each DequantizeLinear of a dynamic FP4 QuantizeLinear (same scale and blocks, no zero
    point) replaced in place by float ops; returns how many were."""
    producers = {out: node for node in graph.node for out in node.output}
    scales = e8m0_tensors(graph)
    names = Names(graph)
    nodes, count = [], 0
    for node in graph.node:
        quantize = _fp4_source(node, producers, scales)
        if quantize is None:
            nodes.append(node)
            continue
        builder = Builder(graph, names, node.output[0])
        x, scale = quantize.input[0], quantize.input[1]
        if is_e8m0_pair(quantize, scales):
            e8m0_round_trip(builder, quantize, node)
        else:
            expanded = block_expanded(builder, x, scale, *_blocks(quantize))
            round_trip(builder, x, expanded, node.output[0])
        nodes.extend(builder.nodes)
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def _fp4_source(
    node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], scales: set[str]
) -> onnx.NodeProto | None:
    """The FP4 QuantizeLinear (or MX one, over a computed E8M0 scale among ``scales``) a
    DequantizeLinear ``node`` reverses, where the emulation can express the pair: same scale
    input, axis and block size, no zero point."""
    if node.op_type != "DequantizeLinear" or node.domain or len(node.input) != 2:
        return None
    quantize = producers.get(node.input[0])
    if quantize is None or quantize.op_type != "QuantizeLinear" or quantize.domain:
        return None
    if len(quantize.input) != 2:
        return None
    if _output_dtype(quantize) not in ELEMENT_FORMATS and not is_e8m0_pair(quantize, scales):
        return None
    same = quantize.input[1] == node.input[1] and _blocks(quantize) == _blocks(node)
    return quantize if same else None


def _blocks(node: onnx.NodeProto) -> tuple[int, int]:
    attributes = {a.name: a.i for a in node.attribute}
    return attributes.get("axis", 1), attributes.get("block_size", 0)


def prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes and initializers no graph output depends on (subgraphs' reads kept)."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output if out) or _has_subgraph(node):
            kept.append(node)
            needed |= set(node.input)
            needed |= _subgraph_reads(node)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.HasField("g") or len(a.graphs) for a in node.attribute)


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    reads: set[str] = set()
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else attr.graphs:
            for inner in sub.node:
                reads |= set(inner.input) | _subgraph_reads(inner)
    return reads

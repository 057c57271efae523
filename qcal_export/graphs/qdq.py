"""QDQ insertion passes: activation QuantizeLinear -> DequantizeLinear pairs, quantized weights.

Each pass edits ``model.graph`` in place (the pipeline works on its own copy of the model) and
appends its nodes; ``sort_nodes`` restores topological order once after all passes.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterator

import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from qcal_export.errors import ModelError
from qcal_export.onnx_io.initializers import initializer_values
from qcal_export.onnx_io.weights import derived_tensor
from qcal_export.spec.formats import Format, pack_nibbles
from qcal_export.spec.granularity import Granularity
from qcal_export.spec.plan import ActivationPlan, SharedActivation, Use, WeightPlan
from qcal_export.spec.scales import QParams

PACKED_TYPES = {TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT4E2M1}
"""ONNX element types stored two per byte, element 2i in the low nibble."""


class Names:
    """Allocates tensor and node names unused anywhere in the graph; finds the graph's nodes
    and initializers by name (an index built once: the passes append, they do not remove
    nodes)."""

    def __init__(self, graph: onnx.GraphProto):
        self._graph = graph
        self._nodes: dict[str, onnx.NodeProto] = {}
        self._inits: dict[str, TensorProto] = {}
        self._readers: dict[str, list[tuple[onnx.NodeProto, int]]] | None = None
        self._outer: set[str] = set()
        self._taken = {t.name for t in graph.initializer}
        self._taken |= {v.name for v in [*graph.input, *graph.output, *graph.value_info]}
        for node in graph.node:
            self._taken |= {node.name, *node.input, *node.output}

    def new(self, base: str) -> str:
        name, k = base, 1
        while name in self._taken:
            name, k = f"{base}_{k}", k + 1
        self._taken.add(name)
        return name

    def node(self, name: str) -> onnx.NodeProto:
        """The node called ``name`` (KeyError if none)."""
        if name not in self._nodes:
            self._nodes = {n.name: n for n in self._graph.node}
        return self._nodes[name]

    def initializer(self, name: str) -> TensorProto:
        """The main-graph initializer called ``name``."""
        if name not in self._inits:
            self._inits = {t.name: t for t in self._graph.initializer}
        return self._inits[name]

    def is_read(self, tensor: str) -> bool:
        """Whether a node (in a subgraph too) reads ``tensor`` or it is a graph output; the
        readers are indexed on the first call, when the nodes that may stop reading it are
        already in the graph (the passes rewire, and append nodes that read new tensors)."""
        if self._readers is None:
            self._readers = {}
            for node in self._graph.node:
                for index, name in enumerate(node.input):
                    self._readers.setdefault(name, []).append((node, index))
                for attr in node.attribute:
                    for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                        self._outer |= {t for inner in all_nodes(sub) for t in inner.input}
            self._outer |= {o.name for o in self._graph.output}
        if tensor in self._outer:
            return True
        return any(node.input[i] == tensor for node, i in self._readers.get(tensor, ()))


def make_tensor(name: str, values: torch.Tensor, elem_type: int) -> TensorProto:
    """An initializer holding ``values`` as ONNX ``elem_type``: fp8 as raw bytes, 4-bit types
    as packed codes (``values`` holds the integers, or the E2M1 codes for FLOAT4E2M1)."""
    if elem_type == TensorProto.FLOAT8E4M3FN:
        raw = values.contiguous().view(torch.uint8).cpu().numpy().tobytes()
        return helper.make_tensor(name, elem_type, list(values.shape), raw, raw=True)
    if elem_type in PACKED_TYPES:
        raw = pack_nibbles(values.cpu()).numpy().tobytes()
        return helper.make_tensor(name, elem_type, list(values.shape), raw, raw=True)
    array = values.cpu().numpy().astype(helper.tensor_dtype_to_np_dtype(elem_type))
    return numpy_helper.from_array(array, name)


def _qdq_inputs(
    graph: onnx.GraphProto, names: Names, base: str, q: QParams, float_type: int
) -> list[str]:
    scale = names.new(f"{base}_scale")
    zero_point = names.new(f"{base}_zero_point")
    graph.initializer.append(make_tensor(scale, q.scale, float_type))
    graph.initializer.append(
        make_tensor(zero_point, q.fmt.encode_zero_point(q.zero_point), q.fmt.onnx_type)
    )
    return [scale, zero_point]


def rewire(uses: list[Use], tensor: str, replacement: str, names: Names) -> None:
    """Point each of ``uses`` (once per node input, whoever asked for it) at ``replacement``."""
    for name, index in dict.fromkeys((use.node, use.index) for use in uses):
        node = names.node(name)
        if node.input[index] != tensor:
            raise ModelError(f"node {name!r} input {index} is not {tensor!r}")
        node.input[index] = replacement


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` topologically, keeping the original order where it is free.

    The passes append their nodes at the end; one sort after all passes puts each node after
    the producers of its inputs.
    """
    produced_by = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    waiting_on = [
        {produced_by[t] for t in _node_inputs(node) if t in produced_by} for node in graph.node
    ]
    consumers: dict[int, list[int]] = {}
    for i, deps in enumerate(waiting_on):
        for d in deps:
            consumers.setdefault(d, []).append(i)
    ready = [i for i, deps in enumerate(waiting_on) if not deps]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for c in consumers.get(i, ()):
            waiting_on[c].discard(i)
            if not waiting_on[c]:
                heapq.heappush(ready, c)
    if len(order) != len(graph.node):
        raise ModelError(f"graph {graph.name!r} has a cycle: cannot order its nodes")
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def _node_inputs(node: onnx.NodeProto) -> Iterator[str]:
    """Inputs of ``node`` and the outer-scope names its subgraphs read."""
    yield from node.input
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else attr.graphs:
            for inner in all_nodes(sub):
                yield from inner.input


def qdq_node(
    op: str,
    source: str,
    params: list[str],
    output: str,
    granularity: Granularity,
    names: Names,
    tensor: str,
    **attributes: int,
) -> onnx.NodeProto:
    """A QuantizeLinear or DequantizeLinear node named after the tensor it quantizes."""
    return helper.make_node(
        op,
        [source, *params],
        [output],
        names.new(f"{tensor}_{op}"),
        **granularity.onnx_attributes(),
        **attributes,
    )


def insert_activation_qdq(
    graph: onnx.GraphProto, plan: ActivationPlan, q: QParams, names: Names
) -> list[str]:
    """``X -> QuantizeLinear -> DequantizeLinear -> consumers`` for the planned uses of X;
    returns the names of the scale and zero point initializers."""
    params = _qdq_inputs(graph, names, plan.tensor, q, plan.elem_type)
    insert_shared_qdq(graph, plan, params, q.granularity, names)
    return params


def insert_shared_qdq(
    graph: onnx.GraphProto,
    plan: ActivationPlan | SharedActivation,
    params: list[str],
    granularity: Granularity,
    names: Names,
) -> None:
    """``X -> QuantizeLinear -> DequantizeLinear -> consumers`` with the scale and zero point
    initializers ``params`` (another tensor's, for a tensor that shares its scale)."""
    tensor = plan.tensor
    quantized = names.new(f"{tensor}_quantized")
    dequantized = names.new(f"{tensor}_dequantized")
    rewire(plan.uses, tensor, dequantized, names)
    graph.node.extend(
        [
            qdq_node("QuantizeLinear", tensor, params, quantized, granularity, names, tensor),
            qdq_node(
                "DequantizeLinear", quantized, params, dequantized, granularity, names, tensor
            ),
        ]
    )


def quantize_weight(
    graph: onnx.GraphProto, plan: WeightPlan, q: QParams, mode: str, names: Names
) -> list[str]:
    """Store the weight quantized (``mode="quantized"``) or keep it float with a Q -> DQ pair;
    returns the names of the scale and zero point initializers."""
    tensor = plan.tensor
    init = names.initializer(tensor)
    params = _qdq_inputs(graph, names, tensor, q, init.data_type)
    stored = names.new(f"{tensor}_quantized")
    dequantized = names.new(f"{tensor}_dequantized")
    gran = q.granularity
    if mode == "quantized":

        def quantized() -> TensorProto:
            weight = initializer_values(init)
            shape = tuple(weight.shape)
            scale, zero_point = gran.expand(q.scale, shape), gran.expand(q.zero_point, shape)
            return make_tensor(stored, q.fmt.quantize(weight, scale, zero_point), q.fmt.onnx_type)

        graph.initializer.append(derived_tensor(stored, init, qparams_tag(q), quantized))
    else:
        graph.node.append(qdq_node("QuantizeLinear", tensor, params, stored, gran, names, tensor))
    graph.node.append(
        qdq_node("DequantizeLinear", stored, params, dequantized, gran, names, tensor)
    )
    rewire(plan.uses, tensor, dequantized, names)
    drop_if_unused(graph, init, mode, names)
    return params


def qparams_tag(q: QParams) -> str:
    """A digest of what a weight quantized with ``q`` depends on besides the weight."""
    digest = hashlib.sha256(f"{q.fmt.name}|{q.granularity.describe()}".encode())
    for value in (q.scale, q.zero_point, q.global_scale):
        if value is not None:
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().double().numpy().tobytes())
    return "q" + digest.hexdigest()[:24]


def drop_if_unused(graph: onnx.GraphProto, init: TensorProto, mode: str, names: Names) -> None:
    """Remove the float weight once the quantized copy replaced all its uses, and its graph
    input entry in either mode (exporters' ``keep_initializers_as_inputs``).

    The weight was calibrated as a constant: an input that could override it would bypass its
    scales, and a graph input left without its initializer would have to be fed.
    """
    if mode == "quantized" and not names.is_read(init.name):
        graph.initializer.remove(init)
    inputs = [value for value in graph.input if value.name == init.name]
    for value in inputs:
        graph.input.remove(value)


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs (If, Loop, Scan bodies), depth first."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                yield from all_nodes(sub)


def required_opset(
    formats: list[Format], granularities: list[Granularity], float_types: set[int]
) -> int:
    """Lowest default-domain opset whose Q/DQ ops take these formats, axes and scale types."""
    opset = max([10, *(f.min_opset for f in formats)])
    attributes = {key for g in granularities for key in g.onnx_attributes()}
    if "axis" in attributes:
        opset = max(opset, 13)
    if "block_size" in attributes:
        opset = max(opset, 21)
    if float_types - {TensorProto.FLOAT}:
        opset = max(opset, 19)
    return opset


def raise_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """``model`` at default-domain opset >= ``target``; only the version number changes when no
    op in the graph changed between the two opsets, else onnx's version converter runs."""
    entry = next(e for e in model.opset_import if e.domain in ("", "ai.onnx"))
    current = entry.version
    if current >= target:
        return model
    changed = sorted(
        {
            n.op_type
            for n in all_nodes(model.graph)
            if n.domain in ("", "ai.onnx")
            and _since(n.op_type, current) != _since(n.op_type, target)
        }
    )
    if changed:
        try:
            model = onnx.version_converter.convert_version(model, target)
        except Exception as e:  # the converter raises bare RuntimeErrors and others
            raise ModelError(
                f"cannot raise the model's opset from {current} to {target} (ops {changed} "
                f"changed): {e}. Export the model at opset {target} or later"
            ) from None
    else:
        entry.version = target
    model.ir_version = max(model.ir_version, _ir_version(target))
    return model


def _since(op_type: str, opset: int) -> int:
    try:
        return onnx.defs.get_schema(op_type, opset, "").since_version
    except onnx.defs.SchemaError:
        return -1


def _ir_version(opset: int) -> int:
    table = [(ir, op) for _, ir, op, *_ in helper.VERSION_TABLE if op is not None]
    return min(ir for ir, op in table if op >= opset)

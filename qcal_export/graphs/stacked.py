"""The float model with chosen activations' per-tensor Q -> DQ applied slot by slot along the
batch axis, so that one run scores many (activation, candidate) pairs.

For method ``auto``'s scoring where a run's launch, not its compute, is the cost (the CUDA EP):
the batch holds ``slots`` copies of a view (every graph input tiled along axis 0), and each
stacked activation's QuantizeLinear -> DequantizeLinear pair, and each pair reading the same
scale initializers (the tensors sharing its scale), becomes: Reshape to ``[slots, -1]``,
QuantizeLinear and DequantizeLinear with a per-slot scale and zero point along axis 0 (on each
slot's rows exactly the per-tensor pair), ``Where`` the slot's open flag is set, else the float
rows unchanged bit for bit, and Reshape back. Only per-tensor Q -> DQ pairs stack (8- and
16-bit integers, fp8); anything else raises ``NotStackable`` and the caller scores one run per
candidate. Valid only where each quantized tensor and each scored graph output is sample-major
along axis 0 and samples do not mix: the caller checks that on the float model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcal_export.graphs.qdq import Names
from qcal_export.graphs.suffix import node_reads
from qcal_export.onnx_io.model_io import default_opset
from qcal_export.spec.plan import Plan

STACK_OPSET = 13
"""QuantizeLinear and DequantizeLinear take a scale per slice of an axis since opset 13."""

FED_ZERO_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16}
"""Zero point types fed per slot; another (fp8's, always 0) is the export's, repeated."""


class NotStackable(Exception):
    """The model's quantization cannot be stacked: the caller scores one run per candidate."""


@dataclass
class Stacked:
    """The stacked model; per activation (in ``tensors``) the export's scale and zero point
    initializers (``params``) and its bool ``[slots]`` open input (``opens``); per initializer
    the ``[slots]`` graph input that replaces it (``inputs``; none for an unfed zero point), its
    exported value (``defaults``, per-slot values for shut slots) and proto (``initializers``:
    its type and shape for the candidates' feeds); ``sources``: the tensors quantized per
    slot, each of which must be sample-major."""

    model: onnx.ModelProto
    tensors: list[str]
    params: dict[str, list[str]]
    opens: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, np.ndarray] = field(default_factory=dict)
    initializers: dict[str, TensorProto] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)


def stack_activations(
    exported: onnx.ModelProto, plan: Plan, params: Mapping[str, list[str]]
) -> Stacked:
    """``exported`` (the QDQ form of ``plan``, which quantizes activations only; edited in
    place) with each planned activation's pairs, and its sharers', quantized per slot.
    ``params``: the export's ``activation_params``. NotStackable where a pair is not a
    per-tensor QuantizeLinear -> DequantizeLinear or the opset is below ``STACK_OPSET``."""
    opset = default_opset(exported)
    if opset < STACK_OPSET:
        raise NotStackable(f"opset {opset} has no per-axis QuantizeLinear (needs {STACK_OPSET})")
    graph = exported.graph
    inits = {t.name: t for t in graph.initializer}
    stacked = Stacked(exported, list(plan.activations), {})
    for tensor in stacked.tensors:
        stacked.params[tensor] = _per_tensor_params(tensor, params.get(tensor, []), inits)
    owner = {name: t for t, held in stacked.params.items() for name in held}
    pairs = _pairs(graph, owner)
    names = Names(graph)
    head: list[onnx.NodeProto] = []
    per: dict[str, _PerSlot] = {}
    for tensor in stacked.tensors:
        nodes, per[tensor] = _slot_inputs(graph, stacked, tensor, inits, names)
        head += nodes
    replaced: dict[int, list[onnx.NodeProto]] = {id(q): [] for q, _ in pairs}
    for q, dq in pairs:
        replaced[id(dq)] = _stack_pair(q, dq, per[owner[q.input[1]]], names)
    stacked.sources = list(dict.fromkeys(q.input[0] for q, _ in pairs))
    nodes = head + [n for node in graph.node for n in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unread(graph, owner.keys() | {q.output[0] for q, _ in pairs})
    return stacked


def _drop_unread(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the initializers and value infos among ``names`` that no node reads now."""
    read = set().union(*(node_reads(n) for n in graph.node))
    gone = names - read
    kept = [t for t in graph.initializer if t.name not in gone]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    infos = [v for v in graph.value_info if v.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _per_tensor_params(tensor: str, held: list[str], inits: dict[str, TensorProto]) -> list[str]:
    """``held`` (a scale and a zero point initializer, one value each), else NotStackable."""
    if len(held) != 2 or any(n not in inits or int(np.prod(inits[n].dims)) != 1 for n in held):
        raise NotStackable(
            f"activation {tensor!r} is not quantized by a per-tensor QuantizeLinear -> "
            "DequantizeLinear pair"
        )
    return list(held)


def _pairs(
    graph: onnx.GraphProto, owner: dict[str, str]
) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """Every QuantizeLinear -> DequantizeLinear pair reading the initializers in ``owner``
    (initializer -> its activation); NotStackable where another node reads them, a pair reads
    two activations' values or a block size, or a quantized tensor goes elsewhere."""
    producers = {out: node for node in graph.node for out in node.output}
    readers = [node for node in graph.node if node_reads(node) & owner.keys()]
    pairs = []
    for dq in readers:
        if dq.op_type == "QuantizeLinear":
            continue
        q = producers.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or not _same_params(q, dq, owner):
            raise NotStackable(
                f"node {dq.name!r} reads an activation's scale outside a per-tensor "
                "QuantizeLinear -> DequantizeLinear pair"
            )
        pairs.append((q, dq))
    quantized = {q.output[0] for q, _ in pairs}
    paired_q = {id(q) for q, _ in pairs}
    unpaired = [n.name for n in readers if n.op_type == "QuantizeLinear" and id(n) not in paired_q]
    dqs = {id(dq) for _, dq in pairs}
    stray = [n.name for n in graph.node if node_reads(n) & quantized and id(n) not in dqs]
    if unpaired or stray or quantized & {o.name for o in graph.output}:
        raise NotStackable(
            f"a QuantizeLinear's output goes elsewhere than its DequantizeLinear "
            f"({[*unpaired, *stray] or 'a graph output'})"
        )
    return pairs


def _same_params(q: onnx.NodeProto, dq: onnx.NodeProto, owner: dict[str, str]) -> bool:
    """Whether ``q`` and ``dq`` read the same scale and at most one zero point, all of one
    activation (in ``owner``), with no block size."""
    if any(a.name == "block_size" for a in [*q.attribute, *dq.attribute]):
        return False
    zeros = {name for name in (*q.input[2:3], *dq.input[2:3]) if name}
    held = {q.input[1], *zeros}
    return (
        q.input[1] == dq.input[1]
        and len(zeros) <= 1
        and held <= owner.keys()
        and len({owner[name] for name in held}) == 1
    )


@dataclass(frozen=True)
class _PerSlot:
    """One activation's per-slot tensors: scale and zero point ``[slots]``, open flags
    ``[slots, 1]``, and the shape ``[slots, -1]``."""

    scale: str
    zero: str
    open_column: str
    rows: str


def _slot_inputs(
    graph: onnx.GraphProto,
    stacked: Stacked,
    tensor: str,
    inits: dict[str, TensorProto],
    names: Names,
) -> tuple[list[onnx.NodeProto], _PerSlot]:
    """The graph inputs of ``tensor``'s slots (recorded in ``stacked``) and the nodes that
    derive its open column, row shape and, for an unfed zero point, the zero points."""
    scale, zero = stacked.params[tensor]
    opened = names.new(f"{tensor}/qcal_open")
    stacked.opens[tensor] = opened
    graph.input.append(helper.make_tensor_value_info(opened, TensorProto.BOOL, ["slots"]))
    fed = [scale] + ([zero] if inits[zero].data_type in FED_ZERO_TYPES else [])
    for name in (scale, zero):
        stacked.initializers[name] = TensorProto()
        stacked.initializers[name].CopyFrom(inits[name])
    for name in fed:
        stacked.inputs[name] = names.new(f"{name}/slots")
        stacked.defaults[name] = numpy_helper.to_array(inits[name]).reshape(())
        elem = inits[name].data_type
        graph.input.append(helper.make_tensor_value_info(stacked.inputs[name], elem, ["slots"]))
    count, column, rows = (names.new(f"{opened}_{k}") for k in ("count", "column", "rows"))
    axis, minus_one = (names.new(f"{opened}_{k}") for k in ("axis", "minus_one"))
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1], np.int64), axis),
            numpy_helper.from_array(np.array([-1], np.int64), minus_one),
        ]
    )
    nodes = [
        helper.make_node("Shape", [opened], [count], names.new(count)),
        helper.make_node("Unsqueeze", [opened, axis], [column], names.new(column)),
        helper.make_node("Concat", [count, minus_one], [rows], names.new(rows), axis=0),
    ]
    zeros = stacked.inputs.get(zero)
    if zeros is None:
        zeros = names.new(f"{zero}/slots")
        nodes += _expanded(zero, inits[zero].data_type, count, zeros, names)
    return nodes, _PerSlot(stacked.inputs[scale], zeros, column, rows)


def _expanded(value: str, elem: int, count: str, out: str, names: Names) -> list[onnx.NodeProto]:
    """``value`` (one ``elem``, fp8's zero point) repeated ``count`` times as ``out``, through
    float (Expand takes no fp8; fp8 values are exact in float)."""
    wide, repeated = names.new(f"{out}_float"), names.new(f"{out}_expanded")
    return [
        helper.make_node("Cast", [value], [wide], names.new(wide), to=TensorProto.FLOAT),
        helper.make_node("Expand", [wide, count], [repeated], names.new(repeated)),
        helper.make_node("Cast", [repeated], [out], names.new(out), to=elem),
    ]


def _stack_pair(
    q: onnx.NodeProto, dq: onnx.NodeProto, per: _PerSlot, names: Names
) -> list[onnx.NodeProto]:
    """The nodes that replace the pair ``q`` -> ``dq``: the pair per slot along axis 0 on the
    rows of the slots ``per.open_column`` opens, the float rows elsewhere; the output is
    ``dq``'s, so that its readers are unchanged."""
    x = q.input[0]
    shape, rows, quantized, dequantized, chosen = (
        names.new(f"{x}/slots_{k}") for k in ("shape", "rows", "q", "dq", "chosen")
    )
    q_inputs = [rows, per.scale] + ([per.zero] if len(q.input) > 2 and q.input[2] else [])
    dq_inputs = [quantized, per.scale] + ([per.zero] if len(dq.input) > 2 and dq.input[2] else [])
    per_slot_q = helper.make_node(
        "QuantizeLinear", q_inputs, [quantized], names.new(q.name), axis=0
    )
    per_slot_dq = helper.make_node(
        "DequantizeLinear", dq_inputs, [dequantized], names.new(dq.name), axis=0
    )
    per_slot_q.attribute.extend(a for a in q.attribute if a.name != "axis")
    per_slot_dq.attribute.extend(a for a in dq.attribute if a.name != "axis")
    return [
        helper.make_node("Shape", [x], [shape], names.new(shape)),
        helper.make_node("Reshape", [x, per.rows], [rows], names.new(rows)),
        per_slot_q,
        per_slot_dq,
        helper.make_node(
            "Where", [per.open_column, dequantized, rows], [chosen], names.new(chosen)
        ),
        helper.make_node("Reshape", [chosen, shape], [dq.output[0]], names.new(dq.output[0])),
    ]

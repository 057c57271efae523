"""The part of a model downstream of some of its graph inputs, as a model of its own.

For method ``auto``'s scoring: a run that opens one activation's gate changes nothing upstream
of the gates, so its runs compute only the nodes downstream of the gates' input, and read what
they need from upstream (``fed``) out of one float run of the whole model per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import onnx
from onnx import helper


@dataclass
class Suffix:
    """The downstream model, and the upstream tensors it takes as graph inputs (``fed``) beside
    the original graph inputs it still reads. ``outputs`` are the original graph outputs it
    computes; the others do not depend on its starting inputs."""

    model: onnx.ModelProto
    fed: list[str]
    outputs: list[str]


def node_reads(node: onnx.NodeProto) -> set[str]:
    """The tensors ``node`` reads: its inputs and the outer-scope names its subgraphs use."""
    reads = {name for name in node.input if name}
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else attr.graphs:
            reads |= _outer_reads(sub)
    return reads


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    reads: set[str] = set()
    for node in graph.node:
        reads |= node_reads(node) - defined
        defined |= set(node.output)
    return reads | ({o.name for o in graph.output} - defined)


def upstream_reads(model: onnx.ModelProto, starts: Iterable[str]) -> list[str]:
    """The tensors computed upstream (not graph inputs, not initializers) that the nodes
    downstream of ``starts`` read: what ``downstream_model`` takes as inputs."""
    return _downstream(model, set(starts))[1]


def downstream_model(
    model: onnx.ModelProto, starts: Iterable[str], types: Mapping[str, int]
) -> Suffix:
    """The nodes of ``model`` that read (through any path) a graph input in ``starts``, with the
    constant nodes they need, as a model whose upstream inputs have the element types
    ``types`` (name -> ONNX element type).

    It holds ``model``'s initializers that it reads (copied protos: stored weights stay
    pointers into their store)."""
    graph = model.graph
    nodes, fed, reads = _downstream(model, set(starts))
    produced = {o for node in nodes for o in node.output}
    outputs = [o for o in graph.output if o.name in produced]
    suffix = helper.make_graph(
        nodes,
        f"{graph.name}_downstream",
        [i for i in graph.input if i.name in reads]
        + [helper.make_tensor_value_info(name, types[name], None) for name in fed],
        outputs,
        initializer=[t for t in graph.initializer if t.name in reads],
    )
    out = helper.make_model(suffix, opset_imports=model.opset_import, ir_version=model.ir_version)
    return Suffix(out, fed, [o.name for o in outputs])


def _downstream(
    model: onnx.ModelProto, starts: set[str]
) -> tuple[list[onnx.NodeProto], list[str], set[str]]:
    """(the downstream nodes with their constant nodes in order, the upstream tensors they
    read, every tensor they read from outside)."""
    graph = model.graph
    changed = set(starts)
    inits = {t.name for t in graph.initializer}
    constant = set(inits)
    kept: list[onnx.NodeProto] = []
    constant_nodes: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        reads = node_reads(node)
        if reads & changed:
            kept.append(node)
            changed |= set(node.output)
        elif reads <= constant:
            constant |= set(node.output)
            constant_nodes.update(dict.fromkeys(node.output, node))
    nodes = _with_constants(kept, constant_nodes)
    produced = {o for node in nodes for o in node.output}
    reads = set().union(*(node_reads(n) for n in nodes)) - produced
    fed = sorted(reads - inits - {i.name for i in graph.input})
    return nodes, fed, reads


def _with_constants(
    kept: list[onnx.NodeProto], constant_nodes: dict[str, onnx.NodeProto]
) -> list[onnx.NodeProto]:
    """``kept`` with, ahead of them, the constant nodes whose outputs they read (transitively),
    in the original order."""
    needed: dict[int, onnx.NodeProto] = {}
    pending = [name for node in kept for name in node_reads(node)]
    while pending:
        node = constant_nodes.get(pending.pop())
        if node is not None and id(node) not in needed:
            needed[id(node)] = node
            pending.extend(node_reads(node))
    order = {id(node): i for i, node in enumerate(constant_nodes.values())}
    return sorted(needed.values(), key=lambda n: order[id(n)]) + kept

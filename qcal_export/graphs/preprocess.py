"""Normalise a model as other exporters write it before planning: name its nodes, turn
``Constant`` nodes and the constant-only sub-graphs that compute a weight into initializers, and
infer its tensor types; say what changed, and which weights still cannot be found.

The folding is onnx-ir's ``LiftConstantsToInitializersPass`` and onnxscript's constant folder,
limited to the nodes of weight sub-graphs so that nothing else in the graph changes.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
from onnxscript.optimizer import fold_constants

from qcal_export.graphs.op_inputs import WEIGHT_INPUTS, is_activation_input
from qcal_export.graphs.targets import name_nodes
from qcal_export.onnx_io.weights import embed, store_embedded

log = logging.getLogger(__name__)

_UNFOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"}
"""Ops whose output changes from run to run: never constant, never folded."""


@dataclass
class PreprocessResult:
    """The pre-processed model, one line per change made, the counts behind them, and the
    weight-input nodes whose weight is still no initializer, each with why (node -> why)."""

    model: onnx.ModelProto
    changes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    unfound_weights: dict[str, str] = field(default_factory=dict)
    opset_from: int | None = None
    """The file's opset where the opset was raised before planning (``graphs/opset_first``)."""

    def to_report(self) -> dict[str, Any]:
        return {
            "changes": self.changes,
            "counts": self.counts,
            "unfound_weights": self.unfound_weights,
        }


def preprocess(model: onnx.ModelProto) -> PreprocessResult:
    """``model`` (edited in place where only names and types change; else a new proto) ready
    to plan.

    Weight sub-graphs: a chain of nodes computed from constants only (initializers, ``Constant``
    nodes) ending at the weight input of MatMul, Gemm, Conv or ConvTranspose, such as
    ``Constant -> Cast -> Transpose``; each becomes one initializer, shared where the chain was.
    Only a model with such a chain is folded (and then all its ``Constant`` nodes are lifted);
    any other keeps its graph, ``Constant`` nodes included.
    """
    result = PreprocessResult(model)
    unnamed = sum(1 for n in model.graph.node if not n.name)
    repeated = len(model.graph.node) - unnamed - len({n.name for n in model.graph.node if n.name})
    name_nodes(model)
    if unnamed or repeated:
        result.counts["named_nodes"] = unnamed + repeated
        result.changes.append(
            f"named {unnamed + repeated} unnamed or repeated node name(s) <name or OpType>_<index>"
        )
    chains = weight_chains(model.graph)
    if chains:
        result.model = _fold(model, chains, result)
    _infer_types(result)
    result.unfound_weights = unfound_weights(result.model.graph)
    return result


def weight_chains(graph: onnx.GraphProto) -> set[str]:
    """Names of the main-graph nodes (``Constant`` included) that compute a weight input of a
    weight op from constants only, where that input is no initializer already."""
    producers = {o: n for n in graph.node for o in n.output}
    constant = constant_tensors(graph)
    chains: set[str] = set()
    pending = [
        node.input[axes.index]
        for node in graph.node
        if (axes := WEIGHT_INPUTS.get(node.op_type)) is not None and len(node.input) > axes.index
    ]
    outputs = {o.name for o in graph.output}
    while pending:
        tensor = pending.pop()
        producer = producers.get(tensor)
        if producer is None or tensor not in constant or tensor in outputs:
            continue
        if producer.name not in chains:
            chains.add(producer.name)
            pending += [t for t in producer.input if t]
    return chains


def constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors of the main graph known before any input is fed: initializers (also those listed
    as graph inputs: exporters mean them as constants) and what default-domain nodes without
    subgraphs compute from them alone (nodes in graph order, as ONNX requires)."""
    constant = {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        plain = not node.domain and node.op_type not in _UNFOLDABLE
        if plain and not _has_subgraph(node) and all(t in constant for t in node.input):
            constant.update(node.output)
    return constant - {""}


def unfound_weights(graph: onnx.GraphProto) -> dict[str, str]:
    """Nodes of a weight op whose weight input is still no initializer, each with why; a MatMul
    or Gemm whose second input is computed from graph inputs multiplies two activations (both
    are quantized as such) and is not listed."""
    producers = {o: n for n in graph.node for o in n.output}
    initializers = {t.name for t in graph.initializer}
    inputs = {value.name for value in graph.input} - initializers
    constant = constant_tensors(graph)
    unfound = {}
    for node in graph.node:
        axes = WEIGHT_INPUTS.get(node.op_type)
        if axes is None or len(node.input) <= axes.index or node.input[axes.index] in initializers:
            continue
        tensor = node.input[axes.index]
        if is_activation_input(node, axes.index):
            fate = "quantized per tensor as an activation, not as a weight"
        else:
            fate = "that weight stays float"
        where = f"{node.op_type} {node.name!r}: weight input {axes.index} {tensor!r}"
        if tensor in inputs:
            why = "is a graph input, fed at run time (store it as an initializer to quantize it)"
        elif tensor in constant:
            producer = producers[tensor]
            why = f"is computed by {producer.op_type} {producer.name!r}, which could not be folded"
        elif node.op_type in ("Conv", "ConvTranspose"):
            why = "is computed at run time from graph inputs"
        else:
            continue
        unfound[node.name] = f"{where} {why}: {fate}"
    return unfound


def _fold(model: onnx.ModelProto, chains: set[str], result: PreprocessResult) -> onnx.ModelProto:
    """Lift ``Constant`` nodes to initializers and fold the nodes of ``chains`` (onnx-ir and
    onnxscript's folder); the graph's inputs and outputs keep their names."""
    graph = model.graph
    weights = set(_chain_initializers(graph, chains))
    listed = [value for value in graph.input if value.name in weights]
    for value in listed:
        graph.input.remove(value)
    if listed:
        result.changes.append(
            f"initializer(s) {sorted(v.name for v in listed)} were also graph inputs: made "
            "constants (no longer inputs) so that the weights computed from them fold"
        )
    for init in graph.initializer:  # the folder reads these: their data into the proto
        if init.name in weights:
            embed(init)
    ir_model = ir.serde.deserialize_model(model)
    ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(ir_model)
    fold_constants(
        ir_model,
        input_size_limit=sys.maxsize,
        output_size_limit=sys.maxsize,
        should_fold=lambda node: node.name in chains,
    )
    folded = ir.serde.serialize_model(ir_model)
    store_embedded(folded)
    _describe(graph, folded.graph, chains, result)
    return folded


def _describe(
    graph: onnx.GraphProto, folded: onnx.GraphProto, chains: set[str], result: PreprocessResult
) -> None:
    """Count into ``result`` what folding ``graph`` into ``folded`` changed, one line each."""
    after = {n.name for n in folded.node}
    gone = {n.name: n for n in graph.node if n.name not in after}
    lifted = [name for name, n in gone.items() if n.op_type == "Constant"]
    weight_nodes = [name for name in gone if name in chains and name not in lifted]
    others = [name for name in gone if name not in chains and name not in lifted]
    computed = {t for n in gone.values() for t in n.output}
    inputs = {n.name: list(n.input) for n in graph.node}
    rewired = [
        f"{n.name}:{i}"
        for n in folded.node
        for i, tensor in enumerate(n.input)
        if n.name in inputs
        and i < len(inputs[n.name])
        and inputs[n.name][i] not in (tensor, *computed)
    ]
    new_weights = sorted(_weight_initializers(folded) - _weight_initializers(graph))

    def ops(names: list[str]) -> str:
        return ", ".join(sorted({gone[name].op_type for name in names}))

    lines = {
        "constants_lifted": (lifted, "lifted {n} Constant node(s) to initializers"),
        "weight_nodes_folded": (
            weight_nodes,
            f"folded {{n}} node(s) computing weights from constants ({ops(weight_nodes)}) "
            "into initializers",
        ),
        "other_nodes_simplified": (
            others,
            f"the folder also simplified away {{n}} node(s) ({ops(others)}) it could evaluate",
        ),
        "inputs_rewired": (
            rewired,
            "the folder rewired {n} node input(s) past nodes that copy their input "
            "(Identity-like), same values: {first}",
        ),
        "weights_found": (new_weights, "{n} weight(s) now initializers: {first}"),
    }
    for key, (found, line) in lines.items():
        if found:
            result.counts[key] = len(found)
            first = f"{found[:5]}" + (" ..." if len(found) > 5 else "")
            result.changes.append(line.format(n=len(found), first=first))


def _chain_initializers(graph: onnx.GraphProto, chains: set[str]) -> list[str]:
    """The initializers the nodes of ``chains`` read."""
    initializers = {t.name for t in graph.initializer}
    return [t for n in graph.node if n.name in chains for t in n.input if t in initializers]


def _weight_initializers(graph: onnx.GraphProto) -> set[str]:
    """Initializers read as the weight input of a weight op."""
    initializers = {t.name for t in graph.initializer}
    return {
        node.input[axes.index]
        for node in graph.node
        if (axes := WEIGHT_INPUTS.get(node.op_type)) is not None
        and len(node.input) > axes.index
        and node.input[axes.index] in initializers
    }


def _infer_types(result: PreprocessResult) -> None:
    """Record onnx shape inference's types and shapes of the main graph's tensors in the model
    (their value_info), counting those it found and those whose type stays unknown."""
    model = result.model
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, ValueError) as e:
        result.changes.append(f"shape inference failed ({e}): types come from ONNX Runtime")
        return
    known = {v.name for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]}
    added = [v for v in inferred.graph.value_info if v.name not in known]
    model.graph.value_info.extend(added)
    typed = known | {v.name for v in added} | {t.name for t in model.graph.initializer}
    untyped = [t for n in model.graph.node for t in n.output if t and t not in typed]
    result.counts["types_inferred"] = len(added)
    result.counts["types_unknown"] = len(untyped)
    if added:
        result.changes.append(f"shape inference recorded the type of {len(added)} tensor(s)")
    if untyped:
        result.changes.append(
            f"shape inference: {len(untyped)} tensor(s) of unknown type (no Q/DQ on them): "
            f"{untyped[:5]}" + (" ..." if len(untyped) > 5 else "")
        )


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.HasField("g") or len(a.graphs) for a in node.attribute)

"""Map torch modules onto the ONNX graph ``torch.onnx.export`` made of them: per module, the
nodes that read its weight, the initializer holding it (as is, or transposed) and its output.

Exporters keep parameter names as initializer names unless they rewrite the tensor: Linear
weights become a transposed copy (``val_*``, ``onnx::MatMul_*``), a BatchNorm may be folded into
the preceding Conv. A weight is found by name, then by value (the array or, 2-D, its
transpose); nodes reading an equal weight (tied or equal weights) are told apart by the module
scope the exporter records (dynamo: ``pkg.torch.onnx.name_scopes``; legacy: ``/a/b/Op`` names).
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from qcal_export.graphs.op_inputs import WEIGHT_INPUTS
from qcal_export.onnx_io.tensor_types import FLOAT_TYPES
from qcal_export.onnx_io.weights import to_array

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
REWRITE_RULE = "pkg.onnxscript.rewriter.rule_name"


@dataclass(frozen=True)
class ModuleWeights:
    """One module as the mapper sees it: its weight and bias (float32 arrays) and the weight's
    (output-channel, reduction) axes as torch stores it; None where unknown."""

    name: str
    weight: np.ndarray
    bias: np.ndarray | None = None
    axes: tuple[int, int] | None = None

    @property
    def parameter(self) -> str:
        return f"{self.name}.weight" if self.name else "weight"


@dataclass(frozen=True)
class NodeMatch:
    """A node computing the module: input ``weight_index`` reads initializer ``weight`` (the
    module's weight, transposed when ``transposed``); ``output`` is the tensor after the
    module's bias (None: not found)."""

    node: str
    op_type: str
    weight: str
    weight_index: int
    transposed: bool
    output: str | None = None


@dataclass
class ModuleMap:
    """Modules mapped to their nodes, and the others with the reason each could not be."""

    mapped: dict[str, list[NodeMatch]] = field(default_factory=dict)
    unmapped: dict[str, str] = field(default_factory=dict)


def map_modules(model: onnx.ModelProto, modules: Iterable[ModuleWeights]) -> ModuleMap:
    """Find every module's nodes in ``model`` (read only; nodes named, see ``name_nodes``)."""
    modules = list(modules)
    graph = _Graph(model, modules)
    result = ModuleMap()
    for module in modules:
        found = graph.match(module)
        if isinstance(found, str):
            result.unmapped[module.name] = found
        else:
            result.mapped[module.name] = found
    return result


def fold_weight_identities(model: onnx.ModelProto) -> int:
    """Let nodes read initializers directly where an ``Identity`` copies them (the legacy
    exporter's form of a shared weight); returns the number of Identity nodes removed."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    kept = {o.name for o in graph.output} | _subgraph_reads(graph)
    renames = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "Identity" and n.input[0] in initializers and n.output[0] not in kept
    }
    if not renames:
        return 0
    remaining = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in renames)]
    for node in remaining:
        for index, name in enumerate(node.input):
            node.input[index] = renames.get(name, name)
    del graph.node[:]
    graph.node.extend(remaining)
    return len(renames)


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                names |= {i for n in sub.node for i in n.input} | _subgraph_reads(sub)
    return names


def node_scopes(node: onnx.NodeProto) -> set[str]:
    """Names of the modules whose forward produced ``node``, as the exporter recorded them."""
    meta = {p.key: p.value for p in node.metadata_props}
    if NAME_SCOPES in meta:
        try:
            scopes = ast.literal_eval(meta[NAME_SCOPES])
        except (ValueError, SyntaxError):
            return set()
        return {s for s in scopes[:-1] if s}
    if not node.name.startswith("/"):
        return set()
    names, prefix = set(), ""
    for part in node.name.split("/")[1:-1]:
        prefix = part if not prefix or part.startswith(f"{prefix}.") else f"{prefix}.{part}"
        names.add(prefix)
    return names


def _key(array: np.ndarray) -> tuple:
    digest = hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).digest()
    return array.dtype.str, array.shape, digest


class _Graph:
    """Lookups over one graph: initializer arrays by name and by value, consumers, scopes."""

    def __init__(self, model: onnx.ModelProto, modules: list[ModuleWeights]):
        graph = model.graph
        self.nodes = {n.name: n for n in graph.node}
        self.initializers = {t.name: t for t in graph.initializer}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            for index, name in enumerate(node.input):
                self.consumers.setdefault(name, []).append((node, index))
        self._arrays: dict[str, np.ndarray] = {}
        shapes = {m.weight.shape for m in modules} | {m.weight.T.shape for m in modules}
        self._by_value: dict[tuple, list[str]] = {}
        for name, init in self.initializers.items():
            if tuple(init.dims) in shapes:
                self._by_value.setdefault(_key(self.array(name)), []).append(name)

    def array(self, name: str) -> np.ndarray:
        """The initializer's values; float types as float32, as the module weights come."""
        if name not in self._arrays:
            init = self.initializers[name]
            array = to_array(init)
            if init.data_type in FLOAT_TYPES:
                array = array.astype(np.float32)
            self._arrays[name] = array
        return self._arrays[name]

    def match(self, module: ModuleWeights) -> list[NodeMatch] | str:
        """The module's nodes, or why there are none."""
        stored = self._stored(module)
        if not stored:
            return self._why_not_found(module)
        candidates = [c for name, transposed in stored for c in self._readers(name, transposed)]
        if not candidates:
            readers = sorted(
                {n.op_type for name, _ in stored for n, _ in self.consumers.get(name, [])}
            )
            return (
                f"its weight (initializer {stored[0][0]!r}) is read by {readers or 'no node'}, "
                "not as the weight of a MatMul, Gemm, Conv or ConvTranspose"
            )
        fitting = [c for c in candidates if self._fits(c, module)]
        if not fitting:
            return (
                f"node {candidates[0].node!r} ({candidates[0].op_type}) reads its weight along "
                "other axes than the module's layout"
            )
        chosen = self._in_scope(module.name, fitting)
        if isinstance(chosen, str):
            return chosen
        return [replace(c, output=self._output(c, module.bias)) for c in chosen]

    def _stored(self, module: ModuleWeights) -> list[tuple[str, bool]]:
        """Initializers holding the weight: by name, else by value; (name, transposed)."""
        weight = module.weight
        named = self.initializers.get(module.parameter)
        if named is not None and _equal(self.array(module.parameter), weight):
            return [(module.parameter, False)]
        found = [(name, False) for name in self._by_value.get(_key(weight), [])]
        if weight.ndim == 2:
            found += [(name, True) for name in self._by_value.get(_key(weight.T), [])]
        return [
            (name, t) for name, t in found if _equal(self.array(name), weight.T if t else weight)
        ]

    def _readers(self, name: str, transposed: bool) -> list[NodeMatch]:
        return [
            NodeMatch(node.name, node.op_type, name, index, transposed)
            for node, index in self.consumers.get(name, [])
            if node.op_type in WEIGHT_INPUTS and WEIGHT_INPUTS[node.op_type].index == index
        ]

    def _fits(self, match: NodeMatch, module: ModuleWeights) -> bool:
        """The node's channel and reduction axes are the module's (transposed if stored so)."""
        if module.axes is None:
            return True
        axes = WEIGHT_INPUTS[match.op_type]
        node = self.nodes[match.node]
        rank = module.weight.ndim
        channel, reduction = module.axes
        if match.transposed:
            channel, reduction = 1 - channel, 1 - reduction
        return (axes.channel(node, rank), axes.reduction(node, rank)) == (channel, reduction)

    def _in_scope(self, module: str, matches: list[NodeMatch]) -> list[NodeMatch] | str:
        """The matches whose node belongs to ``module``; all of them when only one node reads
        the weight, or none of the nodes says whose it is."""
        scoped = {m.node: node_scopes(self.nodes[m.node]) for m in matches}
        if not module:
            return matches
        inside = [m for m in matches if module in scoped[m.node]]
        if inside:
            return inside
        unknown = [m for m in matches if not scoped[m.node]]
        if len({m.node for m in unknown}) == 1 and len(unknown) == len(matches):
            return unknown
        nodes = sorted({m.node for m in matches})
        return (
            f"nodes {nodes[:4]} read an equal weight but none records this module's scope "
            "(a tied or equal weight used elsewhere): cannot tell which is this module's"
        )

    def _output(self, match: NodeMatch, bias: np.ndarray | None) -> str | None:
        """The tensor after the bias: the node's output, or the Add of the bias after it."""
        node = self.nodes[match.node]
        out = node.output[0]
        if bias is None or (len(node.input) > 2 and node.input[2]):
            return out
        adds = [
            reader.output[0]
            for reader, index in self.consumers.get(out, [])
            if reader.op_type == "Add" and self._is_bias(reader.input[1 - index], bias)
        ]
        return adds[0] if len(adds) == 1 else None

    def _is_bias(self, name: str, bias: np.ndarray) -> bool:
        if name not in self.initializers:
            return False
        return _equal(self.array(name).reshape(-1), bias.reshape(-1))

    def _why_not_found(self, module: ModuleWeights) -> str:
        fix = (
            "so its scales do not apply: the exporter changed the weight (folded a BatchNorm "
            "into it?); fuse such layers before calibrating"
        )
        named = module.parameter
        if named in self.initializers:
            rules = {
                p.value
                for node, _ in self.consumers.get(named, [])
                for p in node.metadata_props
                if p.key == REWRITE_RULE
            }
            how = f" (rewrite {sorted(rules)})" if rules else ""
            return f"initializer {named!r} holds other values than the parameter{how}, {fix}"
        own = [
            f"node {n.name!r} in its scope reads {n.input[WEIGHT_INPUTS[n.op_type].index]!r}"
            for n in self.nodes.values()
            if n.op_type in WEIGHT_INPUTS and module.name in node_scopes(n)
        ]
        if own:
            return f"no initializer equals its weight or its transpose ({own[0]}), {fix}"
        return (
            "no initializer equals its weight or its transpose, and no node records its scope: "
            "it did not run in the exported forward, or its weight is computed at run time"
        )


def _equal(array: np.ndarray, other: np.ndarray) -> bool:
    return (
        array.shape == other.shape and array.dtype == other.dtype and np.array_equal(array, other)
    )

"""The plan: which activations and weights of a graph get Q/DQ, for which nodes, and the
edits that add to it or leave nodes out of it."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TypeVar

from onnx import TensorProto

from qcal_export.errors import RecipeError
from qcal_export.spec.granularity import Granularity
from qcal_export.spec.recipe import TensorSpec


@dataclass(frozen=True)
class Use:
    """Input ``index`` of node ``node`` reads the tensor; ``by`` names the node whose rule
    placed the Q/DQ there when that is not ``node`` (a producer quantizing its output)."""

    node: str
    index: int
    by: str | None = None

    @property
    def owner(self) -> str:
        """The node that asked for this use: ``by``, else the reader."""
        return self.by or self.node


@dataclass(frozen=True)
class Blocks:
    """Where a block format's blocks run in an activation: ``axis`` (>= 0) of ``rank``, the
    reduction dimension of every consumer, of static ``length`` (None: known only at run time)."""

    axis: int
    rank: int
    length: int | None


@dataclass
class ActivationPlan:
    """An activation tensor to capture and quantize before the consumers listed.

    ``blocks`` is set for block formats (nvfp4), whose block scales the graph computes.
    """

    tensor: str
    spec: TensorSpec
    elem_type: int
    uses: list[Use] = field(default_factory=list)
    blocks: Blocks | None = None


@dataclass
class WeightPlan:
    """A float initializer quantized with ``granularity`` for the consumers listed.

    ``hessian_input`` is the activation feeding the consumer's reduction (MatMul A, Gemm A)
    when its last axis runs along the weight's blocks: the input of a Hessian-weighted sweep.
    ``shape`` and ``elem_type`` are the initializer's; ``reduction_axis`` the weight axis the
    consumer sums over (MatMul's K, Gemm's by ``transB``), None where the op has none.
    """

    tensor: str
    spec: TensorSpec
    granularity: Granularity
    uses: list[Use] = field(default_factory=list)
    hessian_input: str | None = None
    shape: tuple[int, ...] | None = None
    elem_type: int = TensorProto.FLOAT
    reduction_axis: int | None = None

    @property
    def axis(self) -> int | None:
        """The ONNX ``axis`` of the scale: output channels, or the blocks' axis; None per tensor."""
        return getattr(self.granularity, "axis", None)


@dataclass
class SharedActivation:
    """An activation quantized with the scale of ``source`` (a planned activation or weight):
    the output of a data-movement op that passes its input's integers on unchanged."""

    tensor: str
    source: str
    elem_type: int
    uses: list[Use] = field(default_factory=list)


@dataclass
class Plan:
    """Everything one calibration quantizes, keyed by tensor name.

    ``float_subgraph_nodes``: nodes of a quantized op type inside subgraphs (If, Loop, Scan
    bodies), named ``<owner node>/<attribute>/<node>``; they are left in float. ``notes`` say
    what the plan left out and why, for the report. ``skipped``: nodes of a recipe op type,
    not excluded, that got nothing to quantize, each with why. ``partial``: planned nodes with
    an input (their weight, say) that is not quantized as it should be, each with why: they do
    not count as quantized. ``shared``: activations that reuse another planned tensor's scale
    (calibrated once, on the source).
    ``sentinel_nodes``: nodes the target would place Q/DQ around that read or write sentinel
    values (attention masks), left without. ``stream_nodes``: Adds of the residual stream
    feeding a normalization that the target would place Q/DQ around, left without.
    ``half_nodes``: nodes of float16/bfloat16 the ort target would place Q/DQ around, left
    without (ORT's QLinear kernels take float32 scales only).
    ``placement_notes``: what the target deliberately left float and why (for the report and
    the summary; not a warning, unlike ``notes``).
    """

    activations: dict[str, ActivationPlan]
    weights: dict[str, WeightPlan]
    nodes: list[str]
    excluded: list[str]
    float_subgraph_nodes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    partial: dict[str, str] = field(default_factory=dict)
    shared: dict[str, SharedActivation] = field(default_factory=dict)
    sentinel_nodes: list[str] = field(default_factory=list)
    stream_nodes: list[str] = field(default_factory=list)
    half_nodes: list[str] = field(default_factory=list)
    placement_notes: list[str] = field(default_factory=list)

    def is_quantized(self, tensor: str) -> bool:
        """Whether ``tensor`` gets a Q/DQ (or is a quantized weight) in this plan so far."""
        return tensor in self.activations or tensor in self.weights or tensor in self.shared

    def root(self, tensor: str) -> str:
        """The tensor whose scale ``tensor`` uses: its sharing source, followed to the end."""
        while tensor in self.shared:
            tensor = self.shared[tensor].source
        return tensor


def add_activation(plan: Plan, entry: ActivationPlan, use: Use) -> None:
    """Plan ``entry`` for ``use``; a tensor that already shares a scale keeps sharing it."""
    tensor = entry.tensor
    if tensor in plan.shared:
        plan.shared[tensor].uses.append(use)
        return
    found = plan.activations.setdefault(tensor, entry)
    if (found.spec, found.blocks) != (entry.spec, entry.blocks):
        raise RecipeError(
            f"tensor {tensor!r} feeds node {use.node!r} with spec {entry.spec} but node "
            f"{found.uses[0].node!r} with {found.spec}"
            + (
                f" (blocks {entry.blocks} vs {found.blocks})"
                if entry.blocks != found.blocks
                else ""
            )
            + ": give both nodes the same activation spec, or exclude one"
        )
    found.uses.append(use)


def add_weight(plan: Plan, weight: WeightPlan) -> None:
    """Plan ``weight``; RecipeError if another node planned it otherwise."""
    entry = plan.weights.setdefault(weight.tensor, weight)
    if entry is weight:
        return
    use = weight.uses[0]
    if (entry.spec, entry.granularity) != (weight.spec, weight.granularity):
        raise RecipeError(
            f"weight {weight.tensor!r} is shared by nodes {entry.uses[0].node!r} and "
            f"{use.node!r} that need different quantization ({entry.spec}, "
            f"{entry.granularity.describe()} vs {weight.spec}, {weight.granularity.describe()}): "
            "exclude one or give both the same spec"
        )
    if entry.hessian_input != weight.hessian_input:
        entry.hessian_input = None
    entry.uses.append(use)


def add_shared(plan: Plan, tensor: str, source: str, elem_type: int, uses: list[Use]) -> None:
    """Quantize ``tensor`` for ``uses`` with ``source``'s scale (its root's), as a data-movement
    op passes its input's integers on; a sharing mark wins over the tensor's own scale."""
    entry = plan.shared.get(tensor)
    if entry is None:
        entry = plan.shared[tensor] = SharedActivation(tensor, plan.root(source), elem_type)
        own = plan.activations.pop(tensor, None)
        if own is not None:
            entry.uses.extend(own.uses)
    entry.uses.extend(uses)


_Planned = TypeVar("_Planned", ActivationPlan, WeightPlan, SharedActivation)


def without_nodes(plan: Plan, nodes: Collection[str]) -> Plan:
    """``plan`` with ``nodes`` left in float: their uses dropped (those they read and those
    they asked for), the tensors no other planned node uses, and the tensors sharing a scale
    whose source is gone."""
    left = set(nodes)

    def keep(plans: dict[str, _Planned]) -> dict[str, _Planned]:
        kept = {}
        for tensor, planned in plans.items():
            uses = [use for use in planned.uses if use.node not in left and use.owner not in left]
            if uses:
                kept[tensor] = dataclasses.replace(planned, uses=uses)
        return kept

    activations, weights = keep(plan.activations), keep(plan.weights)
    shared = {
        tensor: entry
        for tensor, entry in keep(plan.shared).items()
        if entry.source in activations or entry.source in weights
    }
    return dataclasses.replace(
        plan,
        activations=activations,
        weights=weights,
        shared=shared,
        nodes=[node for node in plan.nodes if node not in left],
        excluded=[*plan.excluded, *(node for node in plan.nodes if node in left)],
    )

"""Per-layer view and precision search, on one switchable session (``graphs/switchable``).

Units are the switchable model's: quantized nodes and shared-scale groups (a tensor and those
reusing its scale through data movement, as ``--target ort`` places them).
- ``layer_view``: for every unit, the SQNR (dB) of its activations (the float model's
  values against their Q -> DQ), and its sensitivity: the graph outputs' error when only that
  unit is quantized. One streaming pass: each batch runs all-float (the reference, which also
  yields the activations), all-quantized, and once per unit.
- ``search_precision``: the fewest units to leave in float so that the held-out batches meet a
  target (the cosine of each output against float, or its relative L2). Units
  go to float from the most sensitive down until the target is met; then each is tried back
  quantized, least sensitive first, and stays so where the target still holds.

The error of a configuration is that of its worst graph output over all batches, as validation
measures it (``validation/output_error``): the least cosine and the largest relative L2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from qcal_export.capture.data import DataSource, feeds, model_inputs
from qcal_export.capture.onnxruntime import open_session
from qcal_export.errors import DataError, RecipeError
from qcal_export.graphs.switchable import ENABLE, Switchable
from qcal_export.onnx_io.tensor_types import FLOAT_TYPES, tensor_types
from qcal_export.validation.output_error import ErrorTally

METRICS = ("cosine", "rel_l2")


@dataclass(frozen=True)
class Target:
    """An output-error target: ``cosine`` at least ``value``, or ``rel_l2`` at most it."""

    metric: str
    value: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise RecipeError(f"target metric must be one of {METRICS}, not {self.metric!r}")
        if not (0 < self.value <= 1 if self.metric == "cosine" else self.value > 0):
            raise RecipeError(f"target {self.metric} {self.value} is out of range")

    def met(self, error: dict[str, float]) -> bool:
        if self.metric == "cosine":
            return error["cosine"] >= self.value
        return error["rel_l2"] <= self.value

    def loss(self, error: dict[str, float]) -> float:
        """How far from float an error is, in this target's metric (larger is worse)."""
        return 1.0 - error["cosine"] if self.metric == "cosine" else error["rel_l2"]


class SwitchedRuns:
    """One ORT session over a switchable model: runs batches under given switch settings."""

    def __init__(self, switchable: Switchable, providers: list[str], name: str):
        model = switchable.model
        types = tensor_types(model)
        floats = FLOAT_TYPES | {onnx.TensorProto.DOUBLE}
        self.outputs = [
            o.name for o in model.graph.output if o.type.tensor_type.elem_type in floats
        ]
        probes = {t for pair in switchable.probes.values() for t in pair}
        self.session = open_session(
            model,
            providers,
            name,
            extra_outputs={t: types[t] for t in sorted(probes - set(self.outputs))},
        )
        self.inputs = [i for i in model_inputs(model) if i.name != ENABLE]
        self.model = model
        self.nodes = switchable.nodes
        self.units = switchable.units
        self.probes = switchable.probes

    def run(self, feed: dict[str, np.ndarray], enable: np.ndarray, names: list[str]):
        return self.session.run(names, {**feed, ENABLE: enable})

    def feeds(self, source: DataSource, max_batches: int | None = None):
        return feeds(source, self.inputs, max_batches)

    def error(self, source: DataSource, enable: np.ndarray) -> dict[str, float]:
        """The error of one switch setting against all-float, over every batch of ``source``."""
        error = ErrorTally(self.outputs)
        off = np.zeros(len(self.nodes), dtype=bool)
        for feed in self.feeds(source):
            error.add(self.run(feed, off, self.outputs), self.run(feed, enable, self.outputs))
        if not error.batches:
            raise DataError(
                f"{source.description} holds no batch: give more batches than holdout_every "
                "(--holdout-every), or a smaller holdout_every"
            )
        return error.worst()


@dataclass
class LayerView:
    """Per node: its output error quantized alone; per activation its SQNR (dB, None where
    the Q -> DQ was exact); the error with every node quantized."""

    alone: dict[str, dict[str, float]]
    activation_sqnr_db: dict[str, float | None]
    all_quantized: dict[str, float]
    batches: int


def layer_view(runs: SwitchedRuns, source: DataSource, max_batches: int) -> LayerView:
    """The per-layer view over the first ``max_batches`` batches of ``source``."""
    count = len(runs.nodes)
    settings = [np.ones(count, dtype=bool), *np.eye(count, dtype=bool)]
    errors = [ErrorTally(runs.outputs) for _ in settings]
    pairs = list(runs.probes.items())
    probe_names = [name for _, pair in pairs for name in pair]
    signal, noise = np.zeros(len(pairs)), np.zeros(len(pairs))
    batches = 0
    for feed in runs.feeds(source, max_batches):
        values = runs.run(feed, np.zeros(count, dtype=bool), runs.outputs + probe_names)
        references, probed = values[: len(runs.outputs)], values[len(runs.outputs) :]
        for k in range(len(pairs)):
            x = np.asarray(probed[2 * k], dtype=np.float64)
            signal[k] += float(np.sum(x * x))
            noise[k] += float(np.sum((x - np.asarray(probed[2 * k + 1], dtype=np.float64)) ** 2))
        for enable, error in zip(settings, errors, strict=True):
            error.add(references, runs.run(feed, enable, runs.outputs))
        batches += 1
    sqnr = {
        tensor: 10 * math.log10(signal[k] / noise[k]) if noise[k] > 0 else None
        for k, (tensor, _) in enumerate(pairs)
    }
    alone = {node: errors[1 + i].worst() for i, node in enumerate(runs.nodes)}
    return LayerView(alone, sqnr, errors[0].worst(), batches)


@dataclass
class PrecisionChoice:
    """The nodes left in float, why, and the held-out error along the way."""

    target: Target
    float_nodes: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    heldout: dict[str, float] = field(default_factory=dict)


def search_precision(
    runs: SwitchedRuns, view: LayerView, holdout: DataSource, target: Target
) -> PrecisionChoice:
    """The fewest float nodes (greedy by sensitivity, then pruned) meeting ``target`` on the
    held-out batches, measured on the switchable session."""
    index = {node: i for i, node in enumerate(runs.nodes)}
    ranked = sorted(runs.nodes, key=lambda n: target.loss(view.alone[n]), reverse=True)
    enable = np.ones(len(runs.nodes), dtype=bool)
    current = runs.error(holdout, enable)
    choice = PrecisionChoice(target, steps=[{"change": "all quantized", **current}])
    kept: list[str] = []
    for node in ranked:
        if target.met(current):
            break
        enable[index[node]] = False
        kept.append(node)
        current = runs.error(holdout, enable)
        choice.steps.append({"change": f"{node} float", **current})
    for node in reversed(kept[:-1]):  # least sensitive first; the last one was needed
        enable[index[node]] = True
        trial = runs.error(holdout, enable)
        if target.met(trial):
            kept.remove(node)
            current = trial
            choice.steps.append({"change": f"{node} back to quantized", **trial})
        else:
            enable[index[node]] = False
    rank = {node: k + 1 for k, node in enumerate(ranked)}
    choice.float_nodes = [
        {
            "node": node,
            "sensitivity_rank": rank[node],
            "alone": view.alone[node],
            "reason": f"{rank[node]} of {len(ranked)} by output error when quantized alone "
            f"({target.metric} {view.alone[node][target.metric]:.5g}); quantized, the held-out "
            f"batches miss {target.metric} {target.value:g}",
        }
        for node in kept
    ]
    choice.heldout = current
    return choice

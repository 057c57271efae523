"""The AWQ step (weight method ``awq``): one capture pass keeps each quantized layer input's mean
``|x|`` per channel and a sample of its rows; per input, shared by every awq layer reading it
(q/k/v), the factors ``s`` are searched on their joint output error (``calibrate/awq_search``)
and folded as smoothing folds its own (``graphs/smooth.fold_factors``: ``s`` into the weights,
``1 / s`` into the producer or a Mul); with option ``clip`` each weight block's clip ratio is
searched and the weights clamped (``graphs/awq_clip``). The run then plans, calibrates (max)
and exports the folded model in place of the input model, still the reference of the output
error; the folded model's outputs equal the input model's up to float rounding before clipping.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from qcal_export.analysis.planned import PlannedModel
from qcal_export.calibrate.awq_sample import InputSample
from qcal_export.calibrate.awq_search import AwqLayer, ScaleChoice, search_clip, search_scales
from qcal_export.calibrate.distributed import Ranks
from qcal_export.capture.data import DataSource
from qcal_export.capture.onnxruntime import OrtCapture
from qcal_export.errors import DataError, RecipeError
from qcal_export.graphs.awq_clip import Clip, clip_weights
from qcal_export.graphs.smooth import Smoothable, fold_factors, smoothing_groups
from qcal_export.graphs.targets import find_targets
from qcal_export.onnx_io.tensor_types import tensor_types
from qcal_export.onnx_io.weights import to_array
from qcal_export.spec.methods import AWQ
from qcal_export.spec.plan import Plan

DEFAULTS = {"grid": 20, "clip": 0, "rows": 512}
"""AWQ's options when not given: 20 alphas, no clip search, at most 512 sampled rows."""


@dataclass(frozen=True)
class AwqScaled:
    """The model to calibrate (folded; the input model where nothing was), its plan, a note per
    folded input, the report's ``awq`` section (per input: alpha, errors) and the batches its
    capture pass ran."""

    model: onnx.ModelProto
    plan: Plan
    notes: list[str]
    section: dict[str, Any] = field(default_factory=dict)
    batches: int = 0


def uses_awq(plan: Plan) -> bool:
    """Whether a planned weight has method awq."""
    return any(w.spec.method == AWQ.name for w in plan.weights.values())


def check_awq_scales(plan: Plan, scales_in: object) -> None:
    """AWQ and saved scales cannot go together: the scales follow no new search."""
    if scales_in is not None and uses_awq(plan):
        raise RecipeError(
            "weight method awq searches and folds its factors on the data, which saved scales "
            "do not follow: calibrate again instead of passing scales_in (--scales-in)"
        )


def awq_groups(model: onnx.ModelProto, plan: Plan) -> dict[str, list[Smoothable]]:
    """Per layer input, the MatMul/Gemm nodes reading it whose weight is quantized with awq."""
    awq = {t: w for t, w in plan.weights.items() if w.spec.method == AWQ.name}
    groups = {}
    for tensor, consumers in smoothing_groups(model).items():
        chosen = [
            c
            for c in consumers
            if c.weight in awq and any(u.node == c.node.name for u in awq[c.weight].uses)
        ]
        if chosen:
            groups[tensor] = chosen
    return groups


def apply_awq(
    planned: PlannedModel,
    source: DataSource | None,
    max_batches: int | None,
    ranks: Ranks | None = None,
) -> AwqScaled:
    """Search, fold and (option ``clip``) clip AWQ's factors on the first ``max_batches``
    batches of ``source``, and plan the folded model again."""
    if source is None:
        raise DataError("weight method awq searches its scales on data: pass --data")
    model, plan = planned.model, planned.plan
    groups = awq_groups(model, plan)
    if not groups:
        return AwqScaled(model, plan, ["awq: no awq weight of a MatMul/Gemm reads an activation"])
    options = {**DEFAULTS, **plan.weights[next(iter(groups.values()))[0].weight].spec.options}
    limit = int(options["rows"])
    samples, batches = _capture(planned, groups, source, max_batches, ranks or Ranks(), limit)
    factors, clips, section = _search(groups, samples, planned, options)

    def rule(tensor, found, current):
        if tensor not in factors:
            return None
        names = {c.node.name for c in groups[tensor]}
        return [c for c in found if c.node.name in names], factors[tensor]

    folded, folds = fold_factors(model, rule)
    clip_weights(folded, clips)
    notes = [
        f"awq {tensor} (alpha {section[tensor]['alpha']:g}, {count} consumers): {how}"
        for tensor, count, how in folds
    ]
    replanned = find_targets(folded, planned.recipe)
    replanned.notes = list(dict.fromkeys([*plan.notes, *replanned.notes]))
    return AwqScaled(folded, replanned, notes, section, batches)


def _search(groups, samples, planned, options):
    """Per group input with rows: its factors (by tensor), each clipped weight's ratios (by
    node, with option ``clip``) and the report's record."""
    weights = {t.name: t for t in planned.model.graph.initializer}
    nonfinite = planned.recipe.nonfinite
    factors: dict[str, np.ndarray] = {}
    clips: dict[str, Clip] = {}
    section: dict[str, Any] = {}
    for tensor, consumers in groups.items():
        sample = samples[tensor]
        if sample.mean_abs is None or sample.rows is None:
            continue
        rows = sample.rows.double().numpy()
        layers = [_layer(c, weights, planned.plan) for c in consumers]
        grid = int(options["grid"])
        choice = search_scales(sample.mean_abs.numpy(), rows, layers, grid, nonfinite)
        factors[tensor] = choice.factors
        section[tensor] = _entry(choice, consumers, rows.shape[0])
        if options["clip"]:
            section[tensor]["clip"] = _clip(rows, layers, consumers, choice, nonfinite, clips)
    return factors, clips, section


def _capture(planned, groups, source, max_batches, ranks, limit):
    """One pass over ``source`` keeping each group input's ``InputSample`` (merged across
    ranks, so that every rank folds the same factors), and its batch count."""
    types = tensor_types(planned.model)
    samples = {t: InputSample(limit) for t in groups}
    capture = OrtCapture(
        planned.model,
        {t: types[t] for t in groups},
        providers=planned.providers,
        name=planned.name,
        device_id=planned.device_id,
    )

    def sink(tensor: str, value) -> None:
        samples[tensor].collect(value)

    def one_pass() -> int:
        return capture.run(
            source,
            sink,
            tensors=list(groups),
            max_batches=max_batches,
            allow_empty=ranks.world > 1,
        )

    return samples, ranks.run_pass(one_pass, samples)


def _layer(consumer: Smoothable, weights: dict, plan: Plan) -> AwqLayer:
    weight = plan.weights[consumer.weight]
    values = np.asarray(to_array(weights[consumer.weight]))
    return AwqLayer(consumer.weight, values, consumer.axis, weight.spec, weight.granularity)


def _entry(choice: ScaleChoice, consumers: list[Smoothable], rows: int) -> dict[str, Any]:
    """The report's record of one input: alpha, and the relative output errors (of
    ``sum ||X W||²``) of the choice and of round-to-nearest on the sampled rows."""
    reference = choice.reference or 1.0
    return {
        "alpha": choice.alpha,
        "consumers": [c.node.name for c in consumers],
        "rows": rows,
        "relative_error": choice.error / reference,
        "relative_error_rtn": choice.rtn_error / reference,
    }


def _clip(rows, layers, consumers, choice, nonfinite, clips) -> dict[str, Any]:
    """Search each layer's clip ratios on its scaled weight and input (into ``clips``, by node);
    the report's record: per weight, its relative output error before and after clipping."""
    scaled_rows = rows / choice.factors
    record = {}
    for layer, consumer in zip(layers, consumers, strict=True):
        block = layer.clip_block()
        if block is None:
            record[layer.name] = "not clipped: its scales are not per block of a column"
            continue
        scaled = dataclasses.replace(layer, weight=layer.scaled(choice.factors))
        ratios, before, after = search_clip(scaled_rows, scaled, block, nonfinite)
        clips[consumer.node.name] = Clip(ratios, block, consumer.axis)
        norm = float(np.square(rows @ layer.canonical(layer.weight.astype(np.float64))).sum())
        record[layer.name] = {
            "relative_error": before / (norm or 1.0),
            "relative_error_clipped": after / (norm or 1.0),
            "clipped_blocks": int((ratios < 1).sum()),
        }
    return record

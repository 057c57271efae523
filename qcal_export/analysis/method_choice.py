"""Method ``auto``: per activation, the candidate method that keeps the graph outputs nearest
the float model's, with that activation alone quantized.

The graph outputs, not the activation's own error or its consumers': minimising each layer's
local error is not keeping the model's output (benchmarks/results/design_notes.md has the demo's
figures), and the graph outputs cost nothing more (every run computes the whole graph). The
runs go through the gated model (``graphs/gated``): the float model with each activation's
quantization (Q -> DQ; for NVFP4 its in-graph block scales and FP4 round trip as the exact
emulation computes them, the global scale fed) behind a gate, so that a run computes only the
quantization it scores. One run scores one
candidate on one batch; candidates whose scales are equal (a percentile or entropy range clamped
to the max one) run once, the later ones taking its error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from qcal_export.analysis.planned import PlannedModel
from qcal_export.capture.data import DataSource, feeds, model_inputs
from qcal_export.capture.onnxruntime import open_session
from qcal_export.capture.source import Batch, InputSpec
from qcal_export.errors import RecipeError
from qcal_export.graphs.export import export_qdq
from qcal_export.graphs.fp4_emulation import runnable_or_refuse
from qcal_export.graphs.gated import GATE, Gated, gate_activations
from qcal_export.graphs.suffix import downstream_model, upstream_reads
from qcal_export.onnx_io.tensor_types import FLOAT_TYPES
from qcal_export.onnx_io.weights import to_array
from qcal_export.spec.scales import TensorScales

GATES_PER_SESSION = 16
"""Activations gated in one session: each gate costs every run of that session (its ``If``, the
copy of its shut branch, the fusions it cuts), each session a model build; the activations are
scored a session at a time."""


def choose_activation_methods(
    planned: PlannedModel,
    source: DataSource | None,
    found: dict[str, TensorScales],
    candidates: dict[str, dict[str, TensorScales]],
    samples: int,
) -> tuple[dict[str, TensorScales], dict[str, Any]]:
    """Per activation of ``candidates`` (activation -> method -> scales), the method whose
    graph outputs on the first ``samples`` samples of ``source`` are nearest float (squared
    error summed over outputs and batches; the first method on ties): the chosen scales and the
    report section (per activation: ``picked`` and each method's ``output_rel_l2``).

    The activations are gated ``GATES_PER_SESSION`` at a time, one session after another; a
    session computes only what lies downstream of its gates, reading the tensors it needs from
    upstream out of one float run of the whole model per batch."""
    if source is None:
        raise RecipeError("method auto needs data")
    views = first_samples(source, model_inputs(planned.model), samples)
    order = list(candidates)
    gateds = [
        gated_model(planned, found, set(order[begin : begin + GATES_PER_SESSION]))
        for begin in range(0, len(order), GATES_PER_SESSION)
    ]
    upstream = {name for gated in gateds for name in upstream_reads(gated.model, [GATE])}
    floats = float_runs(planned, views, sorted(upstream))
    choice: dict[str, dict[str, Any]] = {}
    for gated in gateds:
        runs = GatedRuns(gated, planned, floats)
        scale_feeds = {
            tensor: {
                m: _scale_feed(s, runs.gated.scales[tensor], runs.inits)
                for m, s in candidates[tensor].items()
            }
            for tensor in gated.tensors
        }
        choice.update(_score(runs, views, floats, scale_feeds))
    return {t: candidates[t][c["picked"]] for t, c in choice.items()}, choice


def first_samples(source: DataSource, inputs: list[InputSpec], samples: int) -> list[Batch]:
    """The batches of ``source`` that hold its first ``samples`` samples, the last one cut
    along the leading axis where every input's leading dim is free (else kept whole)."""
    views: list[Batch] = []
    taken = 0
    for feed in feeds(source, inputs):
        if taken >= samples:
            break
        sizes = {np.shape(v)[0] if np.ndim(v) else 1 for v in feed.values()}
        free = all(i.dims and i.dims[0] is None for i in inputs if i.name in feed)
        size = sizes.pop() if len(sizes) == 1 else 1
        if free and size > samples - taken:
            feed = {name: value[: samples - taken] for name, value in feed.items()}
            size = samples - taken
        views.append(feed)
        taken += size
    return views


def gated_model(planned: PlannedModel, found: dict[str, TensorScales], tensors: set[str]) -> Gated:
    """The planned float model with a gate over the quantization of each activation in
    ``tensors`` (and of the tensors sharing its scale), at the scales ``found``; weights stay
    float. FP4 activations are gated in their emulation (``runnable_form``), which ORT runs."""
    plan = planned.plan
    narrowed = dataclasses.replace(
        plan,
        activations={t: a for t, a in plan.activations.items() if t in tensors},
        weights={},
        shared={t: s for t, s in plan.shared.items() if plan.root(t) in tensors},
    )
    model = onnx.ModelProto()
    model.CopyFrom(planned.model)
    recipe = planned.recipe
    exported = export_qdq(model, narrowed, found, recipe.weights_mode, recipe.nvfp4_form)
    runnable = runnable_or_refuse(
        exported.model,
        "method auto scores its candidates in ONNX Runtime, which cannot run this model's "
        "quantized form",
    )
    return gate_activations(runnable, narrowed, exported.activation_params)


@dataclass
class FloatRuns:
    """The float model's run of each scored batch: the upstream tensors the gated sessions
    read (per batch, name -> value) and the squared norm of the float graph outputs summed over
    the batches (the output error's reference)."""

    upstream: list[dict[str, np.ndarray]]
    reference: float

    def types(self) -> dict[str, int]:
        """The ONNX element type of each upstream tensor."""
        first = self.upstream[0] if self.upstream else {}
        return {name: helper.np_dtype_to_tensor_dtype(v.dtype) for name, v in first.items()}


def float_runs(planned: PlannedModel, views: list[Batch], upstream: list[str]) -> FloatRuns:
    """Run the float model on each of ``views``, keeping the ``upstream`` tensors."""
    session = open_session(
        planned.model, planned.providers, str(planned.path), extra_outputs=dict.fromkeys(upstream)
    )
    outputs = [o.name for o in planned.model.graph.output]
    names = outputs + [name for name in upstream if name not in outputs]
    runs = FloatRuns([], 0.0)
    for feed in views:
        values = dict(zip(names, session.run(names, feed), strict=True))
        runs.reference += sum(
            _sq(values[o]) for o in outputs if np.issubdtype(values[o].dtype, np.floating)
        )
        runs.upstream.append({name: values[name] for name in upstream})
    return runs


class GatedRuns:
    """One ONNX Runtime session over the part of a gated model downstream of its gates: runs
    a batch with given gates open."""

    def __init__(self, gated: Gated, planned: PlannedModel, floats: FloatRuns):
        self.gated = gated
        self.inits = {t.name: t for t in gated.model.graph.initializer}
        self.suffix = downstream_model(gated.model, [GATE], floats.types())
        model = self.suffix.model
        self.inputs = {i.name for i in model.graph.input}
        floating = FLOAT_TYPES | {onnx.TensorProto.DOUBLE}
        self.outputs = [
            o.name for o in model.graph.output if o.type.tensor_type.elem_type in floating
        ]
        self.session = open_session(model, planned.providers, f"the gated form of {planned.path}")

    def run(
        self,
        feed: dict[str, np.ndarray],
        upstream: dict[str, np.ndarray],
        tensor: str | None = None,
        scales: dict | None = None,
    ) -> list[np.ndarray]:
        """The graph outputs downstream of the gates with the gate of ``tensor`` open (None:
        all shut, the float model) at the scale inputs ``scales``."""
        gate = np.zeros(len(self.gated.tensors), dtype=bool)
        if tensor is not None:
            gate[self.gated.tensors.index(tensor)] = True
        given = {k: v for k, v in (feed | upstream).items() if k in self.inputs}
        return self.session.run(self.outputs, {**given, GATE: gate, **(scales or {})})


def _score(
    runs: GatedRuns,
    views: list[dict[str, np.ndarray]],
    floats: FloatRuns,
    candidates: dict[str, dict[str, dict[str, np.ndarray]]],
) -> dict[str, dict[str, Any]]:
    """Per activation, the picked method and each method's output error relative to float."""
    same = {t: _first_equal(methods) for t, methods in candidates.items()}
    errors = {t: dict.fromkeys(firsts.values(), 0.0) for t, firsts in same.items()}
    for feed, upstream in zip(views, floats.upstream, strict=True):
        reference = runs.run(feed, upstream)
        for tensor, scored in errors.items():
            for method in scored:
                got = runs.run(feed, upstream, tensor, candidates[tensor][method])
                scored[method] += sum(_sq(g, f) for g, f in zip(got, reference, strict=True))
    choice = {}
    for tensor, firsts in same.items():
        relative = {
            m: math.sqrt(errors[tensor][first] / (floats.reference or 1.0))
            for m, first in firsts.items()
        }
        choice[tensor] = {"picked": min(relative, key=relative.get), "output_rel_l2": relative}
    return choice


def _scale_feed(
    scales: TensorScales, names: list[str], inits: dict[str, onnx.TensorProto]
) -> dict[str, np.ndarray]:
    """A candidate's scale (a two-level format's global scale) and, where the graph has one,
    zero point, as the inputs that replace the exported initializers, in their dtypes."""
    q = scales.qparams()
    scale_name, zero_name = (*names, None)[:2]
    scale = q.global_scale if q.fmt.two_level else q.scale
    dtype = to_array(inits[scale_name]).dtype
    feed = {scale_name: scale.numpy().astype(dtype).reshape(inits[scale_name].dims)}
    if zero_name is not None and not q.fmt.symmetric:
        zero = to_array(inits[zero_name])
        values = q.fmt.encode_zero_point(q.zero_point).numpy()
        feed[zero_name] = values.astype(zero.dtype).reshape(zero.shape)
    return feed


def _first_equal(methods: dict[str, dict[str, np.ndarray]]) -> dict[str, str]:
    """Per method, the first method whose scale inputs equal its own (itself if none)."""
    firsts: dict[str, str] = {}
    for method, feed in methods.items():
        firsts[method] = next(
            (m for m in firsts if m == firsts[m] and _equal_feeds(methods[m], feed)), method
        )
    return firsts


def _equal_feeds(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _sq(a: np.ndarray, b: np.ndarray | None = None) -> float:
    d = np.asarray(a, dtype=np.float64)
    if b is not None:
        d = d - np.asarray(b, dtype=np.float64)
    return float(np.sum(d * d))

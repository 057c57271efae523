"""Method ``auto``: per activation, the candidate method that keeps the graph outputs nearest
the float model's, with that activation alone quantized.

The graph outputs, not the activation's own error or its consumers': minimising each layer's
local error is not keeping the model's output (benchmarks/results/design_notes.md has the demo's
figures). The runs go through the gated model (``graphs/gated``): the float model with each
activation's quantization (Q -> DQ; for NVFP4 its in-graph block scales and FP4 round trip as the
exact emulation computes them, the global scale fed) behind a gate, so that a run computes only
the quantization it scores, and only what lies downstream of the gates (``graphs/suffix``). One
run scores one candidate on one batch, several runs at a time on the CPU's cores; candidates
whose scales are equal (a percentile or entropy range clamped to the max one) run once, the
later ones taking its error. The samples come in stages of one, one, two, four... samples
(``auto_samples``) and the candidates race (``auto_race``): one clearly worse than the best on
the samples so far is not scored on the next stage's, and an activation whose candidates left
differ too little to matter is decided.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from qcal_export.analysis.auto_candidates import (
    EXACT,
    exact_constants,
    first_equal,
    narrowed_export,
    scale_feed,
    squared,
)
from qcal_export.analysis.auto_race import Race, Score, screened
from qcal_export.analysis.auto_samples import first_samples, sample_count, sample_stages
from qcal_export.analysis.planned import PlannedModel
from qcal_export.analysis.stacked_scoring import stacked_errors
from qcal_export.calibrators.threads import usable_cores
from qcal_export.capture.data import DataSource, model_inputs
from qcal_export.capture.onnxruntime import open_session
from qcal_export.capture.source import Batch
from qcal_export.errors import RecipeError
from qcal_export.graphs.fp4_emulation import runnable_or_refuse
from qcal_export.graphs.gated import GATE, Gated, gate_activations
from qcal_export.graphs.suffix import downstream_model, upstream_reads
from qcal_export.onnx_io.tensor_types import FLOAT_TYPES
from qcal_export.spec.methods import MAX
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
    report section (per activation: ``picked``, each method's ``output_rel_l2`` and the samples
    it was scored on). A constant of one value keeps max unscored (``exact_constants``).

    On a GPU the candidates are scored many to a run where the model stacks them
    (``stacked_scoring``). The other activations are gated ``GATES_PER_SESSION`` at a
    time, one session after another (on the CPU in stages of samples, runs side by side,
    ``_score``); a session computes only what
    lies downstream of its gates, reading the tensors it needs from upstream out of one float
    run of the whole model per batch."""
    if source is None:
        raise RecipeError("method auto needs data")
    inputs = model_inputs(planned.model)
    views = first_samples(source, inputs, samples)
    on_cpu = _on_cpu(planned.providers)
    choice = {t: _exact() for t in exact_constants(planned.model.graph, candidates)}
    scored = {t: methods for t, methods in candidates.items() if t not in choice}
    if not on_cpu and scored:
        stacked = stacked_errors(planned, found, scored, views, STACKED_ELEMENTS)
        size = sum(sample_count(view) for view in views)
        for t, errors in stacked.errors.items() if stacked else ():
            choice[t] = _choice({m: Score(e, stacked.norm, size) for m, e in errors.items()})
    rest = {t: methods for t, methods in scored.items() if t not in choice}
    if rest:
        stages = sample_stages(views, inputs) if on_cpu else [views]  # a GPU run: its launches
        choice.update(_gated_choice(planned, found, rest, stages))
    return {t: candidates[t][c["picked"]] for t, c in choice.items()}, choice


STACKED_ELEMENTS = 1 << 25
"""The most elements a stacked run's largest scored tensor may hold (128 MiB of float32)."""


def _gated_choice(
    planned: PlannedModel,
    found: dict[str, TensorScales],
    candidates: dict[str, dict[str, TensorScales]],
    stages: list[list[Batch]],
) -> dict[str, dict[str, Any]]:
    """The report entries of the choice scored through gated sessions."""
    order = list(candidates)
    gateds = [
        gated_model(planned, found, set(order[begin : begin + GATES_PER_SESSION]))
        for begin in range(0, len(order), GATES_PER_SESSION)
    ]
    upstream = {name for gated in gateds for name in upstream_reads(gated.model, [GATE])}
    floats = float_runs(planned, [view for stage in stages for view in stage], sorted(upstream))
    workers, threads = scoring_workers(planned.providers)
    choice: dict[str, dict[str, Any]] = {}
    race = Race()
    with ThreadPoolExecutor(1, thread_name_prefix="qcal-auto-open") as opener:
        upcoming = opener.submit(GatedRuns, gateds[0], planned, floats, threads)
        for k, gated in enumerate(gateds):
            runs = upcoming.result()
            if k + 1 < len(gateds):  # the next session opens while this one scores
                upcoming = opener.submit(GatedRuns, gateds[k + 1], planned, floats, threads)
            scale_feeds = {
                tensor: {
                    m: scale_feed(s, runs.gated.scales[tensor], runs.inits)
                    for m, s in candidates[tensor].items()
                }
                for tensor in gated.tensors
            }
            choice.update(_score(runs, stages, floats, scale_feeds, race, workers))
    return choice


def gated_model(planned: PlannedModel, found: dict[str, TensorScales], tensors: set[str]) -> Gated:
    """The planned float model with a gate over the quantization of each activation in
    ``tensors`` (and of the tensors sharing its scale), at the scales ``found``; weights stay
    float. FP4 activations are gated in their emulation (``runnable_form``), which ORT runs."""
    narrowed, exported = narrowed_export(planned, found, tensors)
    runnable = runnable_or_refuse(
        exported.model,
        "method auto scores its candidates in ONNX Runtime, which cannot run this model's "
        "quantized form",
    )
    return gate_activations(runnable, narrowed, exported.activation_params)


@dataclass
class FloatRuns:
    """The float model's run of each scored batch: the upstream tensors the gated sessions
    read and its float graph outputs (per batch, name -> value: the reference a candidate's
    outputs are compared with)."""

    upstream: list[dict[str, np.ndarray]]
    outputs: list[dict[str, np.ndarray]]

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
    runs = FloatRuns([], [])
    for feed in views:
        values = dict(zip(names, session.run(names, feed), strict=True))
        floating = {o: values[o] for o in outputs if np.issubdtype(values[o].dtype, np.floating)}
        runs.outputs.append(floating)
        runs.upstream.append({name: values[name] for name in upstream})
    return runs


class GatedRuns:
    """One ONNX Runtime session over the part of a gated model downstream of its gates: scores
    a batch with one gate open at a time."""

    def __init__(
        self, gated: Gated, planned: PlannedModel, floats: FloatRuns, threads: int | None = None
    ):
        self.gated = gated
        self.inits = {t.name: t for t in gated.model.graph.initializer}
        self.suffix = downstream_model(gated.model, [GATE], floats.types())
        model = self.suffix.model
        self.inputs = {i.name for i in model.graph.input}
        floating = FLOAT_TYPES | {onnx.TensorProto.DOUBLE}
        self.outputs = [
            o.name for o in model.graph.output if o.type.tensor_type.elem_type in floating
        ]
        self.session = open_session(
            model, planned.providers, f"the gated form of {planned.path}", threads=threads
        )

    def errors(
        self,
        feed: dict[str, np.ndarray],
        upstream: dict[str, np.ndarray],
        floats: dict[str, np.ndarray],
        opened: list[tuple[str, dict]],
        pool: ThreadPoolExecutor,
    ) -> list[float]:
        """The squared error of the graph outputs against the float model's (``floats``, by
        name) with each (tensor, scale inputs) of ``opened`` alone open, ``pool`` running them
        side by side."""
        given = {k: v for k, v in (feed | upstream).items() if k in self.inputs}
        reference = [floats[name] for name in self.outputs]

        def error(job: tuple[str, dict]) -> float:
            tensor, scales = job
            gate = np.zeros(len(self.gated.tensors), dtype=bool)
            gate[self.gated.tensors.index(tensor)] = True
            got = self.session.run(self.outputs, {**given, GATE: gate, **scales})
            return sum(squared(g, f) for g, f in zip(got, reference, strict=True))

        return list(pool.map(error, opened))


def _on_cpu(providers: list) -> bool:
    """Whether the runs go to ONNX Runtime's CPU EP first."""
    first = providers[0] if providers else "CPUExecutionProvider"
    return (first[0] if isinstance(first, tuple) else first) == "CPUExecutionProvider"


MAX_WORKERS = 8
"""The most runs scored side by side: each holds a batch's activations in memory."""


def scoring_workers(providers: list) -> tuple[int, int | None]:
    """Runs scored side by side, and each session's threads (None: ONNX Runtime's default).
    On the CPU, one run per core this process may use (at most ``MAX_WORKERS``, the cores
    shared among them): a few samples keep few cores busy, several runs at once use them all.
    On a GPU one run at a time, its kernels filling the device."""
    if not _on_cpu(providers):
        return 1, None
    cores = usable_cores()
    workers = min(cores, MAX_WORKERS)
    return workers, (cores // workers if workers > 1 else None)


def _score(
    runs: GatedRuns,
    stages: list[list[Batch]],
    floats: FloatRuns,
    candidates: dict[str, dict[str, dict[str, np.ndarray]]],
    race: Race,
    workers: int = 1,
) -> dict[str, dict[str, Any]]:
    """Per activation, the picked method, each method's output error relative to float over
    the samples it was scored on, and their count. Every distinct candidate runs on the first
    stage's views; after each stage those still in the ``race`` (``screened``) go on to the
    next. ``workers`` runs at a time."""
    same = {t: first_equal(methods) for t, methods in candidates.items()}
    scores = {t: {m: Score() for m in firsts.values()} for t, firsts in same.items()}
    alive = {t: list(scored) for t, scored in scores.items()}
    batches = iter(zip(floats.upstream, floats.outputs, strict=True))
    with ThreadPoolExecutor(workers, thread_name_prefix="qcal-auto") as pool:
        for stage in stages:
            jobs = [(t, m) for t, methods in alive.items() for m in methods]
            opened = [(t, candidates[t][m]) for t, m in jobs]
            for feed in stage:
                upstream, outputs = next(batches)
                norm = sum(squared(value) for value in outputs.values())
                errors = runs.errors(feed, upstream, outputs, opened, pool)
                for (tensor, method), error in zip(jobs, errors, strict=True):
                    scores[tensor][method].add(error, norm, sample_count(feed))
            typical = race.typical(scores)
            alive = {t: screened(scores[t], methods, typical) for t, methods in alive.items()}
    race.finish(scores)
    return {t: _choice(scores[t], firsts) for t, firsts in same.items()}


def _exact() -> dict[str, Any]:
    """The report entry of an activation ``exact_constants`` found: max, no scores."""
    return {"picked": MAX.name, "output_rel_l2": {}, "samples": {}, "exact": EXACT}


def _choice(scores: dict[str, Score], firsts: dict[str, str] | None = None) -> dict[str, Any]:
    """The report entry of one activation: the method of least error among those scored on the
    most samples (the first on ties), each method's relative error and samples. ``firsts``:
    per method, the method whose score it shares (itself where None)."""
    firsts = firsts or {m: m for m in scores}
    most = max(score.samples for score in scores.values())
    relative = {m: scores[first].relative for m, first in firsts.items()}
    finalists = [m for m, first in firsts.items() if scores[first].samples == most]
    return {
        "picked": min(finalists, key=relative.get),
        "output_rel_l2": relative,
        "samples": {m: scores[first].samples for m, first in firsts.items()},
    }

"""Method ``auto``'s output errors scored many (activation, candidate) pairs per model run.

Where a run's launch, not its compute, is the cost (the CUDA EP), the one-run-per-candidate
scoring of ``method_choice`` spends its time starting runs. Here one run of the stacked model
(``graphs/stacked``) holds a view once per slot along the batch axis: slot 0 the float
reference (every activation in float), each other slot one activation quantized at one
candidate's scale. The errors are those ``method_choice`` sums (squared output error over the
float graph outputs and the view batches, per activation and distinct candidate), up to the
float rounding of a larger batch and of another graph around each Q -> DQ (ONNX Runtime's CPU
rounds a float16 QuantizeLinear inside the gated model's ``If`` unlike at the top level).
Stacking is trusted only where the float model shows, on each view and the view tiled twice,
that each scored output is sample-major along axis 0 (else None: the caller scores one run per
candidate), and only for the activations whose quantized tensors are (the others, a constant
say, are left to the caller); a mixing of samples that a duplicated batch leaves unchanged (a
mean over the batch) goes unseen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from qcal_export.analysis.auto_candidates import first_equal, narrowed_export, scale_feed, squared
from qcal_export.analysis.auto_samples import shared_leading_dim
from qcal_export.analysis.planned import PlannedModel
from qcal_export.capture.data import model_inputs
from qcal_export.capture.onnxruntime import ORT_ERRORS, open_session
from qcal_export.capture.source import Batch
from qcal_export.errors import ModelError
from qcal_export.graphs.stacked import NotStackable, Stacked, stack_activations
from qcal_export.onnx_io.tensor_types import FLOAT_TYPES
from qcal_export.spec.plan import Plan
from qcal_export.spec.scales import TensorScales

log = logging.getLogger(__name__)

SAME_RUN = 1e-6
"""Relative tolerance (of the largest value) between the two halves of the tiled run: one run
computes both with the same kernels."""
ACROSS_BATCH = 1e-2
"""Relative tolerance (of the largest value) between a half of the tiled run and the view's
own run: a batch twice the size may run other kernels, which round otherwise (a TF32 matrix
product keeps 10 mantissa bits), while a tensor off the batch axis differs by the size of its
values."""

Slot = tuple[str, str]
"""An (activation, method) pair quantized in one slot."""


@dataclass
class StackedScores:
    """Per activation stacked and candidate method, the squared output error summed over the
    views (methods of equal scales share one), and the float outputs' squared norm over them.
    The activations of the candidates missing from ``errors`` did not stack."""

    errors: dict[str, dict[str, float]]
    norm: float


def stacked_errors(
    planned: PlannedModel,
    found: dict[str, TensorScales],
    candidates: dict[str, dict[str, TensorScales]],
    views: list[Batch],
    max_elements: int,
) -> StackedScores | None:
    """The squared error of the float graph outputs summed over ``views`` with each activation
    of ``candidates`` (activation -> method -> scales) alone quantized at each candidate (run
    once per distinct candidate, as ``first_equal`` groups them), for the activations that
    stack; None where none does (the reason logged).

    A run holds as many slots as keep its largest scored tensor (a quantized activation or an
    output) within ``max_elements``, at least the reference and one candidate; each run holds
    its own reference, computed by the same kernels at the same shapes as its candidates.
    ``found``: the run's scales, exported as the defaults of shut slots."""
    try:
        outputs = _scored_outputs(planned.model)
        sources = {t: _sources(planned.plan, t) for t in candidates}
        per_sample, off = _check_sample_major(planned, views, sources, outputs)
        candidates = {t: c for t, c in candidates.items() if not sources[t] & off}
        if off:
            log.info(
                "method auto scores %d activation(s) one run per candidate: %s",
                len(sources) - len(candidates),
                f"tensor {min(off)!r} is not sample-major along axis 0",
            )
        if not candidates:
            raise NotStackable("no activation is sample-major along axis 0")
        stacked = stacked_model(planned, found, set(candidates))
        _check_sources(stacked, sources)
        session = open_session(
            stacked.model, planned.providers, f"the stacked form of {planned.path}"
        )
    except (NotStackable, ModelError, *ORT_ERRORS) as e:
        log.info("method auto scores one run per candidate: %s", e)
        return None
    try:
        return _scores(stacked, session, candidates, views, max_elements // per_sample, outputs)
    except ORT_ERRORS as e:
        log.info("method auto scores one run per candidate: the stacked run failed: %s", e)
        return None


def _scores(
    stacked: Stacked,
    session: ort.InferenceSession,
    candidates: dict[str, dict[str, TensorScales]],
    views: list[Batch],
    max_samples: int,
    outputs: list[str],
) -> StackedScores:
    """The stacked runs of ``views``: as many slots a run as hold at most ``max_samples``
    samples in all."""
    feeds = {
        tensor: {
            m: scale_feed(s, stacked.params[tensor], stacked.initializers)
            for m, s in methods.items()
        }
        for tensor, methods in candidates.items()
    }
    firsts = {tensor: first_equal(methods) for tensor, methods in feeds.items()}
    errors = {tensor: dict.fromkeys(same.values(), 0.0) for tensor, same in firsts.items()}
    slots = [(tensor, method) for tensor, scored in errors.items() for method in scored]
    norm = 0.0
    for view in views:
        per_run = max(1, max_samples // _leading_size(view) - 1)
        for begin in range(0, len(slots), per_run):
            chunk = slots[begin : begin + per_run]
            feed = {**_tiled(view, len(chunk) + 1), **_slot_feed(stacked, feeds, chunk)}
            reference = _add_errors(session.run(outputs, feed), chunk, errors)
        norm += reference
    shared = {t: {m: errors[t][first] for m, first in same.items()} for t, same in firsts.items()}
    return StackedScores(shared, norm)


def _add_errors(
    got: list[np.ndarray], chunk: list[Slot], errors: dict[str, dict[str, float]]
) -> float:
    """Add to ``errors`` each slot's squared output error against slot 0 (``got``: the
    outputs of a run of ``chunk``, slots along axis 0); returns slot 0's squared norm."""
    parts = [np.reshape(o, (len(chunk) + 1, -1)) for o in got]
    for k, (tensor, method) in enumerate(chunk, start=1):
        errors[tensor][method] += sum(squared(p[k], p[0]) for p in parts)
    return sum(squared(p[0]) for p in parts)


def stacked_model(
    planned: PlannedModel, found: dict[str, TensorScales], tensors: set[str]
) -> Stacked:
    """The planned float model with the activations ``tensors`` (and the tensors sharing their
    scale) quantized per slot, weights float; NotStackable where it cannot be."""
    narrowed, exported = narrowed_export(planned, found, tensors)
    return stack_activations(exported.model, narrowed, exported.activation_params)


def _scored_outputs(model: onnx.ModelProto) -> list[str]:
    """The graph outputs whose error is scored: those of a float type."""
    floating = FLOAT_TYPES | {onnx.TensorProto.DOUBLE}
    return [o.name for o in model.graph.output if o.type.tensor_type.elem_type in floating]


def _sources(plan: Plan, tensor: str) -> set[str]:
    """The tensors quantized at the scale of the activation ``tensor``: itself and its
    sharers."""
    return {tensor} | {s for s in plan.shared if plan.root(s) == tensor}


def _check_sources(stacked: Stacked, sources: dict[str, set[str]]) -> None:
    """NotStackable where the stacked model quantizes a tensor per slot that was not checked."""
    checked = set().union(*(sources[t] for t in stacked.tensors))
    unchecked = [s for s in stacked.sources if s not in checked]
    if unchecked:
        raise NotStackable(f"tensor {unchecked[0]!r} is quantized per slot but was not checked")


def _check_sample_major(
    planned: PlannedModel, views: list[Batch], sources: dict[str, set[str]], outputs: list[str]
) -> tuple[int, set[str]]:
    """The tensors of ``sources`` (activation -> its quantized tensors) that are not
    sample-major along axis 0, and the most elements one sample takes in any scored tensor;
    NotStackable unless every graph input's leading dim is free and every scored output is.

    Sample-major: in the float model on each of ``views`` and on it tiled twice, the tensor
    doubles its leading dim with both halves the view's own values (samples unmixed). A
    constant is not."""
    model = planned.model
    fixed = [i.name for i in model_inputs(model) if not i.dims or i.dims[0] is not None]
    if fixed:
        raise NotStackable(f"input {fixed[0]!r} has no free leading (batch) dim")
    constants = {t.name for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input} - constants
    quantized = set().union(*sources.values())
    extra = sorted(quantized - inputs - constants - set(outputs))
    session = open_session(
        model, planned.providers, str(planned.path), extra_outputs=dict.fromkeys(extra)
    )
    watched = outputs + extra
    per_sample, off = 1, quantized & constants
    for view in views:
        rows = _leading_size(view)
        once = session.run(watched, view)
        twice = session.run(watched, _tiled(view, 2))
        for name, single, double in zip(watched, once, twice, strict=True):
            if not _repeats(single, double):
                if name in outputs:
                    raise NotStackable(f"output {name!r} is not sample-major along axis 0")
                off.add(name)
            else:
                per_sample = max(per_sample, -(-single.size // rows))
    return per_sample, off


def _repeats(single: np.ndarray, double: np.ndarray) -> bool:
    """Whether ``double`` is ``single`` twice along axis 0: the halves equal each other up to
    ``SAME_RUN`` and ``single`` up to ``ACROSS_BATCH`` (floats, each at least 16 units in the
    last place of the dtype; others exactly)."""
    if single.ndim == 0 or double.shape != (2 * single.shape[0], *single.shape[1:]):
        return False
    first, second = np.split(double, 2)
    if not np.issubdtype(single.dtype, np.floating):
        return np.array_equal(first, single) and np.array_equal(second, single)
    ulps = 16 * float(np.finfo(single.dtype).eps)
    return _close(second, first, max(SAME_RUN, ulps)) and _close(
        first, single, max(ACROSS_BATCH, ulps)
    )


def _close(got: np.ndarray, want: np.ndarray, rtol: float) -> bool:
    """``got`` equals ``want`` within ``rtol`` of each value and of the largest finite one
    (in float32 at least: ``rtol`` is never below 16 of its units in the last place)."""
    a = want.astype(np.promote_types(want.dtype, np.float32), copy=False)
    atol = rtol * float(np.max(np.abs(a), initial=0.0, where=np.isfinite(a)))
    return bool(np.allclose(got, a, rtol=rtol, atol=atol, equal_nan=True))


def _leading_size(view: Batch) -> int:
    """The leading dim all of ``view``'s inputs share; NotStackable where they do not."""
    size = shared_leading_dim(view)
    if size is None:
        raise NotStackable("the view's inputs do not share one leading (batch) dim")
    return size


def _tiled(view: Batch, count: int) -> Batch:
    """``view`` repeated ``count`` times along axis 0."""
    return {name: np.concatenate([value] * count, axis=0) for name, value in view.items()}


def _slot_feed(
    stacked: Stacked, feeds: dict[str, dict[str, dict[str, np.ndarray]]], chunk: list[Slot]
) -> dict[str, np.ndarray]:
    """The per-slot inputs of a run whose slot 0 is the reference and slot k the k-th pair
    of ``chunk`` (its activation open at its method's scale inputs ``feeds``); shut slots hold
    the exported values."""
    count = len(chunk) + 1
    feed = {opened: np.zeros(count, dtype=bool) for opened in stacked.opens.values()}
    for name, given in stacked.inputs.items():
        feed[given] = np.repeat(stacked.defaults[name].reshape(1), count)
    for k, (tensor, method) in enumerate(chunk, start=1):
        feed[stacked.opens[tensor]][k] = True
        for name, value in feeds[tensor][method].items():
            if name in stacked.inputs:
                feed[stacked.inputs[name]][k] = value.reshape(())
    return feed

"""Calibrate a plan's activations: one calibrator per tensor (one per candidate method under
``auto``), fed by capture passes, its state saved for a resume and merged across ranks.

Methods that need an initial range take a max pass first. The first pass also accumulates the
Hessians of layer inputs that weights ask for: ``Xᵀ X`` blocks for Hessian-weighted nvfp4-mse
sweeps, the full ``[K, K]`` for GPTQ. NVFP4 activations get a global scale only: the graph
computes their block scales.

Under ``auto`` a tensor's candidates collect once what they collect alike: percentile, entropy and
hist-mse keep the same histogram, whose state holds max's running range too (max and mse's first
pass keep the same range). One calibrator of each such set collects; the others take a copy of
its state after the pass, one pass in all for ``auto``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import torch

from qcal_export.calibrate.decisions import tensor_scales
from qcal_export.calibrate.detail import activation_detail, detail_calibrators
from qcal_export.calibrate.distributed import Ranks
from qcal_export.calibrate.resume import Progress, StateFile, Stateful, restore_all
from qcal_export.calibrate.tensor import (
    Collector,
    first_pass_calibrator,
    make_calibrator,
    named_collector,
    second_pass,
)
from qcal_export.calibrators import Calibrator
from qcal_export.calibrators.hessian import BlockHessian, FullHessian
from qcal_export.calibrators.histogram import (
    HistogramCalibrator,
    decide_apart,
    decide_together,
)
from qcal_export.calibrators.max import MaxCalibrator
from qcal_export.calibrators.threads import host_workers
from qcal_export.spec.formats import get_format
from qcal_export.spec.granularity import Granularity, PerTensor, PerTensorGroup
from qcal_export.spec.methods import METHODS
from qcal_export.spec.plan import ActivationPlan, Plan
from qcal_export.spec.recipe import TensorSpec
from qcal_export.spec.scales import TensorScales

HISTOGRAM_ONLY = ("hist", "exponent")
"""The keys of a histogram calibrator's state beyond a max calibrator's (the running range)."""
COLLECTING = (
    "collect",
    "_input_dtype",
    "_drop_nonfinite",
    "_skips_nonfinite",
    "_init_state",
    "_update",
    "_count",
)
"""The methods a histogram calibrator collects with: a subclass that overrides none of them
collects the base histogram."""


class CapturePass(Protocol):
    """Streams the data once, calling every collector of a tensor with each captured value;
    returns the number of batches. ``label`` names the pass; the first ``skip`` batches are
    passed over (a resumed run holds them already); ``after_batch(done)`` follows each batch."""

    def __call__(
        self,
        collectors: dict[str, list[Collector]],
        label: str,
        *,
        skip: int = 0,
        after_batch: Callable[[int], None] | None = None,
    ) -> int: ...


def activation_granularity(plan: ActivationPlan) -> Granularity:
    """Per tensor; for block formats per tensor seen as its blocks (the graph's own blocks)."""
    if plan.blocks is None:
        return PerTensor()
    return PerTensorGroup(plan.blocks.axis, get_format(plan.spec.format).block_size)


@dataclass
class ActivationResult:
    """Scales per activation (for a method ``auto`` one its choice replaces: max's), each
    ``auto`` activation's candidates by method, pass counts, the Hessians asked for (blocks
    in ``hessians``, full ``[K, K]`` ones in ``full_hessians``) and, where asked, what a report
    shows of each activation (``calibrate/detail.py``)."""

    scales: dict[str, TensorScales]
    batches_per_pass: list[int]
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    candidates: dict[str, dict[str, TensorScales]] = field(default_factory=dict)
    full_hessians: dict[str, FullHessian] = field(default_factory=dict)
    detail: dict[str, dict] = field(default_factory=dict)


def candidate_specs(tensor: str, spec: TensorSpec) -> list[tuple[str, TensorSpec]]:
    """(key, spec) of each calibrator an activation gets: its own, or under ``auto`` one per
    candidate method (key ``tensor#method``), each with the options that method takes.

    A block format's candidates are the methods that calibrate its global amax
    (``MethodSpec.block_activations``). MX activations never come here: nothing is calibrated
    for them (``runtime_scales``)."""
    among = METHODS[spec.method].among
    if not among:
        return [(tensor, spec)]
    if get_format(spec.format).block_size > 1:
        among = tuple(method for method in among if method.block_activations)
    return [
        (
            f"{tensor}#{method.name}",
            dataclasses.replace(spec, method=method.name, options=_options(spec, method.options)),
        )
        for method in among
    ]


def _options(spec: TensorSpec, taken: frozenset[str]) -> dict[str, float]:
    return {k: v for k, v in spec.options.items() if k in taken}


def calibrate_activations(
    plan: Plan,
    capture: CapturePass,
    nonfinite: str,
    state: StateFile | None = None,
    resume: bool = False,
    ranks: Ranks | None = None,
    detail: bool = False,
) -> ActivationResult:
    """Calibrate the planned activations (and accumulate the Hessians weights ask for).

    ``state`` saves the calibrators every few batches; with ``resume`` the run continues from
    what it saved, and the state file is removed once both passes are done. With ``ranks``
    (several processes, each capturing its shard) the states are merged after each pass.
    ``detail``: also keep what a report shows of each activation (a histogram collected where
    no calibrator keeps one, merged across ranks but never saved: a resumed run, which would
    miss the batches before it, collects none, and a state file resumes whatever is asked).
    """
    ranks = ranks or Ranks()
    specs, cals = _planned_calibrators(plan, nonfinite)
    firsts = {key: first_pass_calibrator(cal) for key, cal in cals.items()}
    hessians = {t: BlockHessian() for t in block_hessian_inputs(plan)}
    full = {t: FullHessian() for t in full_hessian_inputs(plan)}
    progress = state.resume() if state is not None and resume else None
    extra = detail_calibrators(cals, specs, nonfinite) if detail and progress is None else {}
    collectors = _collectors(firsts, specs)
    for tensor, accumulator in [*hessians.items(), *full.items(), *extra.items()]:
        collectors.setdefault(tensor, []).append(named_collector(tensor, accumulator.collect))
    firsts_state: dict[str, Stateful] = {f"first/{t}": c for t, c in firsts.items()}
    firsts_state.update({f"hessian/{t}": h for t, h in hessians.items()})
    firsts_state.update({f"full_hessian/{t}": h for t, h in full.items()})
    merged = {**firsts_state, **{f"detail/{t}": h for t, h in extra.items()}}
    counts = []
    if collectors:
        first = partial(_first_pass, capture, collectors, firsts_state, state, progress)
        counts.append(ranks.run_pass(first, merged))
        _copy_shared(firsts, specs)
    second = second_pass(cals, firsts)
    if second:
        counts.append(_second_pass(capture, second, specs, state, progress, ranks))
    if state is not None:
        state.finish()
    types = {t: a.elem_type for t, a in plan.activations.items()}
    workers = host_workers(ranks.world)
    scales, candidates = _activation_scales(cals, specs, types, workers)
    found = {t: h.hessian for t, h in hessians.items() if h.hessian is not None}
    found_full = {t: h for t, h in full.items() if h.hessian is not None}
    shown = _detail(cals, specs, scales, candidates, extra, firsts) if detail else {}
    return ActivationResult(scales, counts, found, candidates, found_full, shown)


def _detail(
    cals: dict[str, Calibrator],
    specs: dict[str, tuple[str, TensorSpec]],
    scales: dict[str, TensorScales],
    candidates: dict[str, dict[str, TensorScales]],
    extra: dict[str, Calibrator],
    firsts: dict[str, Calibrator],
) -> dict[str, dict]:
    """What a report shows of each activation: every method's scales (a search's candidates,
    else the one method's)."""
    chosen = {t: {s.method: s} for t, s in scales.items() if t not in candidates}
    return activation_detail(cals, specs, {**chosen, **candidates}, extra, firsts)


def _planned_calibrators(
    plan: Plan, nonfinite: str
) -> tuple[dict[str, tuple[str, TensorSpec]], dict[str, Calibrator]]:
    """Per calibrator key (an activation, or ``tensor#method`` for a search's candidates): its
    tensor and spec, and its calibrator."""
    specs = {
        key: (t, spec)
        for t, a in plan.activations.items()
        for key, spec in candidate_specs(t, a.spec)
    }
    cals = {
        key: make_calibrator(spec, activation_granularity(plan.activations[t]), nonfinite)
        for key, (t, spec) in specs.items()
    }
    return specs, cals


def _second_pass(
    capture: CapturePass,
    second: dict[str, Calibrator],
    specs: dict[str, tuple[str, TensorSpec]],
    state: StateFile | None,
    progress: Progress | None,
    ranks: Ranks,
) -> int:
    """Run the second pass of the calibrators that need one (from where a resumed state left
    it); returns its batch count."""
    seconds_state = {f"second/{t}": c for t, c in second.items()}
    skip = 0
    if progress is not None and progress.pass_number == 2 and progress.batches:
        restore_all(seconds_state, progress.snapshots)
        skip = progress.batches
    collectors = _collectors(second, specs)
    saver = state.saver(2, seconds_state) if state is not None else None
    pass_2 = partial(capture, collectors, "pass 2", skip=skip, after_batch=saver)
    return ranks.run_pass(pass_2, seconds_state)


def _collectors(
    cals: dict[str, Calibrator], specs: dict[str, tuple[str, TensorSpec]]
) -> dict[str, list[Collector]]:
    """Per captured tensor, the collect of every calibrator it feeds, but one per set of its
    calibrators that collect the same state (``_leaders``)."""
    collectors: dict[str, list[Collector]] = {}
    leaders = _leaders(cals, specs)
    for key, cal in cals.items():
        if leaders[key] == key:
            tensor = specs[key][0]
            collectors.setdefault(tensor, []).append(named_collector(tensor, cal.collect))
    return collectors


def _copy_shared(cals: dict[str, Calibrator], specs: dict[str, tuple[str, TensorSpec]]) -> None:
    """Give every calibrator that did not collect (``_leaders``) its leader's state (a max
    calibrator led by a histogram one: the running range within it)."""
    for key, leader in _leaders(cals, specs).items():
        if leader != key:
            state = cals[leader].state_dict()
            if isinstance(cals[key], MaxCalibrator):
                state = {k: v for k, v in state.items() if k not in HISTOGRAM_ONLY}
            cals[key].restore(state)


def _leaders(
    cals: dict[str, Calibrator], specs: dict[str, tuple[str, TensorSpec]]
) -> dict[str, str]:
    """Per calibrator, the first calibrator of the same tensor that collects the same state
    (itself where none does); a max calibrator's running range is also held by a histogram
    calibrator's state, which then leads it."""
    statistics = {key: _statistic(cal) for key, cal in cals.items()}
    first: dict[tuple, str] = {}
    for key, statistic in statistics.items():
        if statistic is not None:
            first.setdefault((specs[key][0], *statistic), key)
    leaders = {}
    for key, statistic in statistics.items():
        if statistic is None:
            leaders[key] = key
            continue
        tensor = specs[key][0]
        holders = [
            leader
            for (of, kind, _, *alike), leader in first.items()
            if statistic[0] == "range"
            and of == tensor
            and kind == "histogram"
            and tuple(alike) == statistic[1:]
        ]
        leaders[key] = holders[0] if holders else first[(tensor, *statistic)]
    return leaders


def _statistic(cal: Calibrator) -> tuple | None:
    """What the state of ``cal`` is a function of, besides the values collected, for the kinds
    whose state is the same whatever they decide from it: the running range of a max
    calibrator, the histogram of a histogram calibrator that only decides (percentile,
    entropy, hist-mse). None for any other: it collects alone."""
    kind = type(cal)
    alike = (cal.fmt, cal.granularity, cal.nonfinite)
    if kind is MaxCalibrator:
        return ("range", *alike)
    plain = all(getattr(kind, name) is getattr(HistogramCalibrator, name) for name in COLLECTING)
    if isinstance(cal, HistogramCalibrator) and plain:
        return ("histogram", cal.bins, *alike)
    return None


def _activation_scales(
    cals: dict[str, Calibrator],
    specs: dict[str, tuple[str, TensorSpec]],
    types: dict[str, int],
    workers: int,
) -> tuple[dict[str, TensorScales], dict[str, dict[str, TensorScales]]]:
    """Scales per activation and, for ``auto`` ones, per candidate method (their scales stand
    at the first candidate's until the choice); ``types``: each activation's ONNX type.
    Histogram calibrators of one spec decide together (``decide_together``) on a GPU, on the
    host ``workers`` at a time."""
    _decide_alike(cals, specs, workers)
    scales, candidates = {}, {}
    for key, cal in cals.items():
        tensor, spec = specs[key]
        found = tensor_scales(
            tensor, "activation", spec, cal, PerTensor(), scale_type=types[tensor]
        )
        if key == tensor:
            scales[tensor] = found
        else:
            candidates.setdefault(tensor, {})[spec.method] = found
    scales.update({t: next(iter(c.values())) for t, c in candidates.items()})
    return scales, candidates


def _decide_alike(
    cals: dict[str, Calibrator], specs: dict[str, tuple[str, TensorSpec]], workers: int
) -> None:
    """Decide the histogram calibrators collected on a GPU in batches of one class, spec,
    granularity and group count (the spec sets every other constructor argument): there a
    decision costs its kernel launches. On the host ``workers`` decide side by side (the
    capture's share of the host, ``host_workers``)."""
    batches: dict[tuple, list[HistogramCalibrator]] = {}
    hosted = []
    for key, cal in cals.items():
        if not isinstance(cal, HistogramCalibrator) or not cal.collected:
            continue
        if cal.device.type != "cuda":
            hosted.append(cal)
            continue
        spec = specs[key][1]
        options = tuple(sorted(spec.options.items()))
        alike = (type(cal), spec.format, spec.method, options, cal.granularity, cal.bins)
        batches.setdefault((*alike, cal.groups), []).append(cal)
    for batch in batches.values():
        if len(batch) > 1:
            decide_together(batch)
    if len(hosted) > 1 and workers > 1:
        decide_apart(hosted, workers)


def _first_pass(
    capture: CapturePass,
    collectors: dict[str, list[Collector]],
    objects: dict[str, Stateful],
    state: StateFile | None,
    progress: Progress | None,
) -> int:
    """Run (or resume, or restore a finished) first pass; returns its number of batches."""
    if progress is not None and progress.pass_number == 2:
        restore_all(objects, progress.first_pass)
        return progress.first_pass_batches
    skip = 0
    if progress is not None:
        restore_all(objects, progress.snapshots)
        skip = progress.batches
    saver = state.saver(1, objects) if state is not None else None
    count = capture(collectors, "pass 1", skip=skip, after_batch=saver)
    if state is not None:
        state.end_first_pass(objects, count)
    return count


def hessian_inputs(plan: Plan) -> list[str]:
    """Activations whose ``Xᵀ X`` (blocks or full) a planned weight needs."""
    return sorted({*block_hessian_inputs(plan), *full_hessian_inputs(plan)})


def block_hessian_inputs(plan: Plan) -> list[str]:
    """Activations whose ``Xᵀ X`` blocks a Hessian-weighted weight sweep needs."""
    return sorted(
        {
            w.hessian_input
            for w in plan.weights.values()
            if w.spec.options.get("hessian") and w.hessian_input
        }
    )


def full_hessian_inputs(plan: Plan) -> list[str]:
    """Activations whose full ``Xᵀ X`` a weight method takes (GPTQ)."""
    return sorted(
        {
            w.hessian_input
            for w in plan.weights.values()
            if METHODS[w.spec.method].full_hessian and w.hessian_input
        }
    )

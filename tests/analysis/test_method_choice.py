"""Method auto's scoring against the choice worked out by hand, on a real exported MLP in ONNX
Runtime.

Every candidate of every activation is scored on every batch, one at a time: the float model
with a QuantizeLinear -> DequantizeLinear pair built here by hand on that activation alone (its
planned readers rewired to it, at that candidate's scale), against the float model. From those
errors the two-stage choice (every candidate on the first half of the samples, those near the
best on the rest) is worked out, and the run's scoring (through the gated model, candidates
with equal scales run once, the activations gated all in one session or one per session, runs
side by side) must pick the same candidate and give every candidate's error over its samples.
"""

from __future__ import annotations

import dataclasses
import json
import math
from importlib import resources

import numpy as np
import onnx
import pytest
from mlp import constant_mul_mlp, make_mlp
from onnx import helper, numpy_helper
from test_layer_view import plain_session

from qcal_export.analysis import method_choice
from qcal_export.analysis.auto_samples import first_samples, sample_stages
from qcal_export.artifacts import html_sections
from qcal_export.capture.data import model_inputs, open_data
from qcal_export.errors import RecipeError
from qcal_export.pipeline.calibrate import calibrate_onnx

METHODS = ("max", "hist-mse", "percentile", "entropy")
CLIPPED = {"max_clipped": 0.01}  # small batches: entropy clipping at most 1e-3 is max's


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return make_mlp(tmp_path_factory.mktemp("mlp"), seq=True) / "mlp.onnx"


def mixed_batches(count: int) -> list[dict[str, np.ndarray]]:
    """Heavy-tailed batches, each with a few large outliers of its own size: the candidates
    clip differently, and how far apart they are changes from batch to batch."""
    rng = np.random.default_rng(7)
    batches = []
    for _ in range(count):
        x = rng.standard_t(3.0, (4, 5, 64)).astype(np.float32)
        x[rng.integers(0, 4), rng.integers(0, 5), rng.integers(0, 64, 3)] *= rng.uniform(2, 12)
        batches.append({"x": x})
    return batches


def method_scales(mlp, batches) -> dict[str, dict]:
    """Every tensor's scales calibrated by each single method."""
    return {
        method: calibrate_onnx(
            mlp,
            batches,
            format="int8",
            target="tensorrt",
            method=method,
            method_options=CLIPPED if method == "entropy" else {},
            validate_batches=0,
        ).scales
        for method in METHODS
    }


def alone_model(mlp, tensor: str, scales, readers: set[str], path):
    """The float model with ``tensor`` quantized (int8, per tensor) for its ``readers`` only."""
    model = onnx.load(str(mlp))
    q = scales.qparams()
    scale = float(q.scale.reshape(()))
    graph = model.graph
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(scale, np.float32), "oracle_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "oracle_zero"),
        ]
    )
    first = min(i for i, n in enumerate(graph.node) if n.name in readers)
    for node in graph.node:
        if node.name in readers:
            node.input[:] = ["oracle_dq" if name == tensor else name for name in node.input]
    pair = [
        helper.make_node("QuantizeLinear", [tensor, "oracle_scale", "oracle_zero"], ["oracle_q"]),
        helper.make_node(
            "DequantizeLinear", ["oracle_q", "oracle_scale", "oracle_zero"], ["oracle_dq"]
        ),
    ]
    nodes = [*graph.node[:first], *pair, *graph.node[first:]]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def batch_errors(reference, candidate, batches) -> list[tuple[float, float]]:
    """Per batch: the squared error of the graph output ``y`` and the squared norm of the float
    one, in float64."""
    errors = []
    for batch in batches:
        (want,), (got,) = reference.run(["y"], batch), candidate.run(["y"], batch)
        want, got = want.astype(np.float64), got.astype(np.float64)
        errors.append((float(np.sum((got - want) ** 2)), float(np.sum(want**2))))
    return errors


def screened_choice(per_batch: dict[str, list[tuple[float, float]]], first: int, margin: float):
    """The two-stage choice worked out from every method's per-batch errors: methods of equal
    errors score once; all on the ``first`` batches, those within ``margin`` of the best (if
    more than one) on the rest; the least error among those scored on the most batches.
    Returns (picked, relative error per method, batches per method)."""
    firsts = {m: next(k for k in per_batch if per_batch[k] == per_batch[m]) for m in per_batch}
    distinct = list(dict.fromkeys(firsts.values()))
    early = {m: sum(e for e, _ in per_batch[m][:first]) for m in distinct}
    kept = [m for m in distinct if early[m] <= (1 + margin) * min(early.values())]
    whole = len(next(iter(per_batch.values())))
    count = {m: whole if m in kept and len(kept) > 1 else first for m in distinct}
    relative = {}
    for m, k in firsts.items():
        scored = per_batch[k][: count[k]]
        relative[m] = math.sqrt(sum(e for e, _ in scored) / sum(n for _, n in scored))
    finalists = [m for m in per_batch if count[firsts[m]] == max(count.values())]
    return min(finalists, key=relative.get), relative, {m: count[k] for m, k in firsts.items()}


@pytest.mark.parametrize(
    ("per_session", "margin", "stacked"),
    [
        (16, method_choice.SCREEN_MARGIN, False),
        (1, method_choice.SCREEN_MARGIN, False),
        (16, math.inf, False),
        (16, math.inf, True),  # as on a GPU: every candidate on every sample, many per run
    ],
)
def test_scoring_picks_the_worked_out_choice_and_reports_every_candidate(
    mlp, tmp_path, monkeypatch, per_session, margin, stacked
):
    monkeypatch.setattr(method_choice, "GATES_PER_SESSION", per_session)
    monkeypatch.setattr(method_choice, "SCREEN_MARGIN", margin)
    monkeypatch.setattr(method_choice, "_on_cpu", lambda providers: not stacked)
    scored = []
    stack = method_choice.stacked_errors
    monkeypatch.setattr(
        method_choice, "stacked_errors", lambda *a: scored.append(stack(*a)) or scored[-1]
    )
    batches = mixed_batches(6)
    result = calibrate_onnx(
        mlp,
        batches,
        format="int8",
        target="tensorrt",
        method="auto",
        method_options=CLIPPED,
        auto_samples=4 * len(batches),
        validate_batches=0,
    )
    assert len(scored) == stacked and None not in scored  # stacked where asked, no fallback
    choice = result.report["method_choice"]
    quantized = set(result.report["quantized_nodes"])
    scales = method_scales(mlp, batches)
    reference = plain_session(mlp)
    nodes = onnx.load(str(mlp)).graph.node
    shared = screened = 0
    for tensor, entry in choice.items():
        errors = entry["output_rel_l2"]
        assert list(errors) == list(METHODS)
        readers = {n.name for n in nodes if n.name in quantized and tensor in n.input}
        per_batch = {}
        for method in METHODS:
            path = tmp_path / f"{tensor.strip('/')}_{method}.onnx"
            alone = alone_model(mlp, tensor, scales[method][tensor], readers, path)
            per_batch[method] = batch_errors(reference, plain_session(alone), batches)
        picked, relative, counts = screened_choice(per_batch, len(batches) // 2, margin)
        for method in METHODS:
            assert errors[method] == pytest.approx(relative[method], rel=1e-4), method
        assert entry["samples"] == {m: 4 * n for m, n in counts.items()}
        assert entry["picked"] == picked, (tensor, relative)
        assert len(set(np.round(list(relative.values()), 6))) > 2  # the choice is not trivial
        shared += len(METHODS) - len(set(errors.values()))
        screened += min(counts.values()) < len(batches)
    assert shared > 0  # percentile's range is max's somewhere: scored once
    assert screened > 0 if margin < math.inf else screened == 0
    picked = {t: c["picked"] for t, c in choice.items()}
    assert {t: result.scales[t].method for t in choice} == picked
    for tensor, method in picked.items():
        assert np.array_equal(result.scales[tensor].amax, scales[method][tensor].amax)
    with pytest.raises(RecipeError, match="auto"):
        calibrate_onnx(mlp, batches, weight_method="auto")


def test_auto_scores_the_first_samples_cutting_the_last_batch_where_its_axis_is_free(mlp):
    batches = mixed_batches(3)
    inputs = model_inputs(onnx.load(str(mlp)))
    views = first_samples(open_data(batches), inputs, 6)
    assert [v["x"].shape[0] for v in views] == [4, 2]
    assert np.array_equal(views[1]["x"], batches[1]["x"][:2])
    fixed = [dataclasses.replace(i, dims=(4, *i.dims[1:])) for i in inputs]
    assert [v["x"].shape[0] for v in first_samples(open_data(batches), fixed, 6)] == [4, 4]
    assert len(first_samples(open_data(batches), inputs, 100)) == 3


def test_stages_split_the_samples_in_half_cutting_a_view_where_its_axis_is_free(mlp):
    batches = mixed_batches(3)
    inputs = model_inputs(onnx.load(str(mlp)))
    views = first_samples(open_data(batches), inputs, 10)
    stages = sample_stages(views, inputs)
    assert [[v["x"].shape[0] for v in stage] for stage in stages] == [[4, 1], [3, 2]]
    assert np.array_equal(
        np.concatenate([v["x"] for s in stages for v in s]),
        np.concatenate([b["x"] for b in batches])[:10],
    )
    fixed = [dataclasses.replace(i, dims=(4, *i.dims[1:])) for i in inputs]
    uncut = sample_stages(first_samples(open_data(batches), fixed, 10), fixed)
    assert [[v["x"].shape[0] for v in stage] for stage in uncut] == [[4, 4], [4]]
    one = first_samples(open_data(batches), inputs, 1)
    assert sample_stages(one, inputs) == [one]


@pytest.mark.parametrize(
    ("cores", "want"), [(1, (1, None)), (2, (2, 1)), (6, (6, 1)), (32, (8, 4)), (12, (8, 1))]
)
def test_runs_side_by_side_one_per_usable_core_at_most_eight(monkeypatch, cores, want):
    monkeypatch.setattr(method_choice, "usable_cores", lambda: cores)
    assert method_choice.scoring_workers(["CPUExecutionProvider"]) == want
    cuda = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    assert method_choice.scoring_workers(cuda) == (1, None)


SCALE = 0.3125  # the scalar an exporter wrote as a Constant node


def test_a_scalar_constant_keeps_max_unscored_which_is_its_least_output_error(tmp_path):
    path = tmp_path / "scalar.onnx"
    onnx.save(constant_mul_mlp(SCALE, ["N", 5, 64], 64, np.random.default_rng(3)), str(path))
    batches = mixed_batches(4)
    fixed = {"activation_format": "int8", "target": "ort", "validate_batches": 0}  # as alone_model
    result = calibrate_onnx(path, batches, method="auto", **fixed)
    choice = result.report["method_choice"]
    assert sorted(choice) == ["c", "h", "m", "x"]
    assert choice["c"] == {
        "picked": "max",
        "output_rel_l2": {},
        "samples": {},
        "exact": method_choice.EXACT,
    }
    assert all(choice[t]["output_rel_l2"] for t in "hmx")  # the others are scored
    jsonschema = pytest.importorskip("jsonschema")
    schema = resources.files("qcal_export.artifacts").joinpath("report_schema.json").read_text()
    jsonschema.validate(result.report, json.loads(schema), cls=jsonschema.Draft202012Validator)
    assert "1 constant(s) of one value keep max unscored" in html_sections.method_choice(
        result.report
    )
    assert float(result.scales["c"].amax) == SCALE
    alone = {}
    for method in METHODS:
        scales = calibrate_onnx(path, batches, method=method, **fixed)
        model = alone_model(path, "c", scales.scales["c"], {"mul"}, tmp_path / f"{method}.onnx")
        errors = batch_errors(plain_session(path), plain_session(model), batches)
        alone[method] = sum(e for e, _ in errors)
    assert len(set(alone.values())) > 1  # the candidates differ on c
    assert alone["max"] == min(alone.values())

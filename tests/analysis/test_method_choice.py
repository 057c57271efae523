"""Method auto's scoring against the choice worked out by hand, on a real exported MLP in ONNX
Runtime.

Every candidate of every activation is scored on every sample, one at a time: the float model
with a QuantizeLinear -> DequantizeLinear pair built here by hand on that activation alone (its
planned readers rewired to it, at that candidate's scale), against the float model. From those
errors the race (every candidate on the first sample, those near the best on stages that double
the samples scored) is worked out, and the run's scoring (through the gated model, candidates
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

from qcal_export.analysis import auto_race, method_choice
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


def auto_int8(mlp, batches):
    """Method auto on ``batches``, int8 at the ``tensorrt`` placement, scored on every sample."""
    return calibrate_onnx(
        mlp,
        batches,
        format="int8",
        target="tensorrt",
        method="auto",
        method_options=CLIPPED,
        auto_samples=sum(len(b["x"]) for b in batches),
        validate_batches=0,
    )


def single_samples(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Every sample of ``batches`` as a batch of its own (the race scores samples cut apart)."""
    return [{n: v[i : i + 1] for n, v in b.items()} for b in batches for i in range(len(b["x"]))]


def raced_choice(per_sample: dict[str, list[tuple[float, float]]], margin: float):
    """The race worked out from every method's per-sample errors: methods of equal errors score
    once; all on the first sample, then on stages that double the samples scored (1, 2, 4...),
    those within ``margin / sqrt(samples)`` of the best (if more than one) going on; the least
    error among those scored on the most samples. Returns (picked, relative error per method,
    samples per method)."""
    firsts = {m: next(k for k in per_sample if per_sample[k] == per_sample[m]) for m in per_sample}
    whole = len(next(iter(per_sample.values())))
    alive = list(dict.fromkeys(firsts.values()))
    count, scored = dict.fromkeys(alive, 0), 1
    while alive:
        scored = min(scored, whole)
        count.update(dict.fromkeys(alive, scored))
        total = {m: sum(e for e, _ in per_sample[m][:scored]) for m in alive}
        kept = [
            m for m in alive if total[m] <= (1 + margin / math.sqrt(scored)) * min(total.values())
        ]
        alive = kept if len(kept) > 1 and scored < whole else []
        scored *= 2
    relative = {}
    for m, k in firsts.items():
        errors = per_sample[k][: count[k]]
        relative[m] = math.sqrt(sum(e for e, _ in errors) / sum(n for _, n in errors))
    finalists = [m for m in per_sample if count[firsts[m]] == max(count.values())]
    return min(finalists, key=relative.get), relative, {m: count[k] for m, k in firsts.items()}


@pytest.mark.parametrize(
    ("per_session", "margin", "stacked"),
    [
        (16, auto_race.SCREEN_MARGIN, False),
        (1, auto_race.SCREEN_MARGIN, False),
        (16, math.inf, False),
        (16, math.inf, True),  # as on a GPU: every candidate on every sample, many per run
    ],
)
def test_scoring_picks_the_worked_out_choice_and_reports_every_candidate(
    mlp, tmp_path, monkeypatch, per_session, margin, stacked
):
    monkeypatch.setattr(method_choice, "GATES_PER_SESSION", per_session)
    monkeypatch.setattr(auto_race, "SCREEN_MARGIN", margin)
    monkeypatch.setattr(auto_race, "INDIFFERENCE", 0.0)  # its own test: every race runs out
    monkeypatch.setattr(method_choice, "_on_cpu", lambda providers: not stacked)
    scored = []
    stack = method_choice.stacked_errors
    monkeypatch.setattr(
        method_choice, "stacked_errors", lambda *a: scored.append(stack(*a)) or scored[-1]
    )
    batches = mixed_batches(6)
    samples = single_samples(batches)
    result = auto_int8(mlp, batches)
    assert len(scored) == stacked and None not in scored  # stacked where asked, no fallback
    choice = result.report["method_choice"]
    quantized = set(result.report["quantized_nodes"])
    scales = method_scales(mlp, batches)
    reference = plain_session(mlp)
    nodes = onnx.load(str(mlp)).graph.node
    shared = raced = 0
    for tensor, entry in choice.items():
        errors = entry["output_rel_l2"]
        assert list(errors) == list(METHODS)
        readers = {n.name for n in nodes if n.name in quantized and tensor in n.input}
        per_sample = {}
        for method in METHODS:
            path = tmp_path / f"{tensor.strip('/')}_{method}.onnx"
            alone = alone_model(mlp, tensor, scales[method][tensor], readers, path)
            per_sample[method] = batch_errors(reference, plain_session(alone), samples)
        picked, relative, counts = raced_choice(per_sample, margin)
        for method in METHODS:
            assert errors[method] == pytest.approx(relative[method], rel=1e-4), method
        assert entry["samples"] == counts
        assert entry["picked"] == picked, (tensor, relative)
        assert len(set(np.round(list(relative.values()), 6))) > 2  # the choice is not trivial
        shared += len(METHODS) - len(set(errors.values()))
        raced += min(counts.values()) < len(samples)
    assert shared > 0  # percentile's range is max's somewhere: scored once
    assert raced > 0 if margin < math.inf else raced == 0
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


def test_stages_double_the_samples_cutting_a_view_where_its_axis_is_free(mlp):
    batches = mixed_batches(3)
    inputs = model_inputs(onnx.load(str(mlp)))
    views = first_samples(open_data(batches), inputs, 11)
    stages = sample_stages(views, inputs)
    assert [[v["x"].shape[0] for v in stage] for stage in stages] == [[1], [1], [2], [4], [3]]
    assert np.array_equal(
        np.concatenate([v["x"] for s in stages for v in s]),
        np.concatenate([b["x"] for b in batches])[:11],
    )
    fixed = [dataclasses.replace(i, dims=(4, *i.dims[1:])) for i in inputs]
    uncut = sample_stages(first_samples(open_data(batches), fixed, 11), fixed)
    assert [[v["x"].shape[0] for v in stage] for stage in uncut] == [[4], [4], [4]]
    sizes = [1, 2, 4, 3, 5]  # free axis: the stages hold 1, 1, 2, 4, 7 samples
    odd = [{"x": np.arange(n * 2, dtype=np.float32).reshape(n, 2) + 100 * n} for n in sizes]
    stages = sample_stages(odd, inputs)
    assert [[v["x"].shape[0] for v in stage] for stage in stages] == [
        [1],
        [1],
        [1, 1],
        [3, 1],
        [2, 5],
    ]
    assert np.array_equal(
        np.concatenate([v["x"] for s in stages for v in s]), np.concatenate([v["x"] for v in odd])
    )
    one = first_samples(open_data(batches), inputs, 1)
    assert sample_stages(one, inputs) == [one]


def test_race_keeps_the_candidates_near_the_best_until_they_differ_too_little():
    def scored(*errors, samples=4):
        return {f"m{k}": auto_race.Score(e, 1.0, samples) for k, e in enumerate(errors)}

    margin = auto_race.SCREEN_MARGIN / 2  # over 4 samples: 0.2
    scores = scored(10.0, 11.9, 12.1, 30.0)
    assert auto_race.screened(scores, list(scores), typical=0.0) == ["m0", "m1"]
    assert 11.9 <= (1 + margin) * 10.0 < 12.1
    # the two left differ by 1.9 over 4 samples: within INDIFFERENCE of a typical error per
    # sample of at least 1.9 / (4 * INDIFFERENCE), the activation is decided
    edge = 1.9 / (4 * auto_race.INDIFFERENCE)
    assert auto_race.screened(scores, list(scores), typical=1.01 * edge) == []
    assert auto_race.screened(scores, list(scores), typical=0.99 * edge) == ["m0", "m1"]
    once = scored(10.0, 10.1, samples=1)  # no tie on one sample, however close
    assert auto_race.screened(once, list(once), typical=1e9) == ["m0", "m1"]
    assert auto_race.screened(scored(10.0, 20.0), ["m0", "m1"], typical=0.0) == []
    assert auto_race.screened(scores, [], typical=0.0) == []
    race = auto_race.Race()
    race.finish({"a": scored(8.0, 4.0), "b": {"max": auto_race.Score(12.0, 1.0, 2)}})
    running = {"c": scored(2.0, 40.0, samples=1), "d": {"max": auto_race.Score()}}
    # least per sample: a 1.0, b 6.0, c 2.0; d is not scored yet and counts as 0
    assert race.typical(running) == pytest.approx((1.0 + 6.0 + 2.0 + 0.0) / 4)


def test_an_indifferent_race_decides_every_activation_once_ties_may_be(mlp, monkeypatch):
    monkeypatch.setattr(auto_race, "INDIFFERENCE", math.inf)
    choice = auto_int8(mlp, mixed_batches(3)).report["method_choice"]
    most = [max(entry["samples"].values()) for entry in choice.values()]
    assert auto_race.MIN_TIED in most  # some candidates were near enough to go on, then tied
    for entry in choice.values():
        samples = entry["samples"]
        assert set(samples.values()) <= {1, auto_race.MIN_TIED}
        most = max(samples.values())
        errors = {m: e for m, e in entry["output_rel_l2"].items() if samples[m] == most}
        assert entry["picked"] == min(errors, key=errors.get)


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

"""Method auto's scoring against the exhaustive choice, on a real exported MLP in ONNX Runtime.

The exhaustive choice scores every candidate of every activation on every view batch, one at a
time: the float model with a QuantizeLinear -> DequantizeLinear pair built here by hand on that
activation alone (its planned readers rewired to it, at that candidate's scale), against the
float model. The run's scoring (through the gated model, candidates with equal scales run once, the
activations gated all in one session or one per session) must pick the same candidate and give
every candidate's error, that of the hand-built model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from mlp import make_mlp
from onnx import helper, numpy_helper
from test_layer_view import output_error, plain_session

from qcal_export.analysis import method_choice
from qcal_export.analysis.method_choice import first_samples
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


@pytest.mark.parametrize("per_session", [16, 1])
def test_gated_scoring_picks_the_exhaustive_choice_and_reports_every_candidate(
    mlp, tmp_path, monkeypatch, per_session
):
    monkeypatch.setattr(method_choice, "GATES_PER_SESSION", per_session)
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
    choice = result.report["method_choice"]
    quantized = set(result.report["quantized_nodes"])
    scales = method_scales(mlp, batches)
    reference = plain_session(mlp)
    nodes = onnx.load(str(mlp)).graph.node
    shared = 0
    for tensor, entry in choice.items():
        errors = entry["output_rel_l2"]
        assert list(errors) == list(METHODS)
        readers = {n.name for n in nodes if n.name in quantized and tensor in n.input}
        exhaustive = {}
        for method in METHODS:
            path = tmp_path / f"{tensor.strip('/')}_{method}.onnx"
            alone = alone_model(mlp, tensor, scales[method][tensor], readers, path)
            exhaustive[method] = output_error(reference, plain_session(alone), batches)["rel_l2"]
            assert errors[method] == pytest.approx(exhaustive[method], rel=1e-4), method
        one_at_a_time = min(exhaustive, key=exhaustive.get)  # the first method on ties
        assert entry["picked"] == one_at_a_time, (tensor, exhaustive)
        assert len(set(np.round(list(exhaustive.values()), 6))) > 2  # the choice is not trivial
        shared += len(METHODS) - len(set(errors.values()))
    assert shared > 0  # percentile's range is max's somewhere: scored once
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

"""Method auto's errors scored stacked (many candidates per run) against one run per candidate.

On the MLP (Gemm and MatMul forms) the stacked errors give the relative errors that
``calibrate_onnx(method="auto")`` reports for every candidate; on the attention model (a
uint8 activation, a Transpose sharing its scale) they equal the gated runs' errors of
``method_choice``, however many slots a run holds. A fixed batch dim (an input's, or a
Reshape's inside the graph), a quantized tensor off the batch axis and an NVFP4 activation do not
stack (None, the reason logged).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
from mlp import constant_mul_mlp, half_mlp, make_mlp
from onnx import TensorProto, helper, numpy_helper
from placement_models import attention_batches, attention_model
from test_layer_view import plain_session

from qcal_export import calibrate_onnx
from qcal_export.analysis import auto_race, method_choice
from qcal_export.analysis.auto_candidates import first_equal, scale_feed, squared
from qcal_export.analysis.auto_samples import first_samples
from qcal_export.analysis.planned import PlannedModel
from qcal_export.analysis.stacked_scoring import StackedScores, _repeats, stacked_errors
from qcal_export.capture.data import model_inputs, open_data
from qcal_export.graphs.gated import GATE
from qcal_export.graphs.suffix import upstream_reads
from qcal_export.graphs.targets import find_targets
from qcal_export.spec.recipe import Recipe, TensorSpec

METHODS = ("max", "hist-mse", "percentile", "entropy")
CLIPPED = {"max_clipped": 0.01}  # small batches: entropy clipping at most 1e-3 is max's
CPU = ["CPUExecutionProvider"]
UNBOUNDED = 10**12


def _planned(model: onnx.ModelProto, path, recipe: Recipe) -> PlannedModel:
    onnx.save(model, str(path))
    return PlannedModel(model, find_targets(model, recipe), recipe, path, CPU)


def _views(model: onnx.ModelProto, batches: list) -> list:
    return first_samples(open_data(batches), model_inputs(model), 10**6)


def _flat(scores: StackedScores | None) -> dict[tuple[str, str], float]:
    assert scores is not None
    return {(t, m): e for t, scored in scores.errors.items() for m, e in scored.items()}


def heavy_batches(shape: tuple[int, ...], count: int) -> list[dict[str, np.ndarray]]:
    """Heavy-tailed batches with a few outliers: the candidates clip differently."""
    rng = np.random.default_rng(7)
    batches = []
    for _ in range(count):
        x = rng.standard_t(3.0, shape).astype(np.float32)
        x.reshape(-1)[rng.integers(0, x.size, 3)] *= rng.uniform(2, 12)
        batches.append({"x": x})
    return batches


@pytest.mark.parametrize("seq", [True, False])
def test_stacked_errors_give_the_relative_errors_auto_reports_on_the_mlp(
    tmp_path, monkeypatch, seq
):
    monkeypatch.setattr(auto_race, "SCREEN_MARGIN", math.inf)  # every method, every sample
    monkeypatch.setattr(auto_race, "INDIFFERENCE", 0.0)
    path = make_mlp(tmp_path, seq=seq) / "mlp.onnx"
    batches = heavy_batches((4, 5, 64) if seq else (4, 64), 3)
    common = {"format": "int8", "target": "tensorrt", "validate_batches": 0}
    report = calibrate_onnx(
        path, batches, method="auto", method_options=CLIPPED, auto_samples=12, **common
    ).report["method_choice"]
    scales = {
        m: calibrate_onnx(
            path, batches, method=m, method_options=CLIPPED if m == "entropy" else {}, **common
        ).scales
        for m in METHODS
    }
    model = onnx.load(str(path))
    planned = _planned(model, path, Recipe(target="tensorrt"))
    candidates = {t: {m: scales[m][t] for m in METHODS} for t in planned.plan.activations}
    views = _views(model, batches)
    scores = stacked_errors(planned, scales["max"], candidates, views, UNBOUNDED)
    assert scores is not None and set(scores.errors) == set(report)
    session = plain_session(path)
    reference = sum(squared(session.run(None, v)[0]) for v in views)
    assert scores.norm == pytest.approx(reference, rel=1e-6)
    for tensor, entry in report.items():
        reported = entry["output_rel_l2"]
        for method, error in scores.errors[tensor].items():
            assert math.sqrt(error / reference) == pytest.approx(reported[method], rel=1e-4)
    one_per_run = stacked_errors(planned, scales["max"], candidates, views, 1)
    assert _flat(one_per_run) == pytest.approx(_flat(scores), rel=1e-6)


def gated_errors(planned, found, candidates, views) -> dict[tuple[str, str], float]:
    """Today's errors: one gated run per activation, distinct candidate and view (methods of
    equal scales take the first one's)."""
    gated = method_choice.gated_model(planned, found, set(candidates))
    floats = method_choice.float_runs(planned, views, upstream_reads(gated.model, [GATE]))
    runs = method_choice.GatedRuns(gated, planned, floats)
    errors: dict[tuple[str, str], float] = {}
    with ThreadPoolExecutor(1) as pool:
        for tensor, methods in candidates.items():
            feeds = {m: scale_feed(s, gated.scales[tensor], runs.inits) for m, s in methods.items()}
            for method, first in first_equal(feeds).items():
                if first != method:
                    errors[tensor, method] = errors[tensor, first]
                    continue
                errors[tensor, method] = 0.0
                for view, upstream, outputs in zip(
                    views, floats.upstream, floats.outputs, strict=True
                ):
                    opened = [(tensor, feeds[method])]
                    errors[tensor, method] += runs.errors(view, upstream, outputs, opened, pool)[0]
    return errors


def _shifted(scales, factor: float, shift: int):
    zero = (scales.zero_point + shift).clamp(0, 255)
    return dataclasses.replace(scales, scale=scales.scale * factor, zero_point=zero)


@pytest.mark.parametrize("max_elements", [UNBOUNDED, 2000, 1])
def test_stacked_errors_are_the_gated_runs_with_a_shared_scale_and_uint8(tmp_path, max_elements):
    model = attention_model()
    recipe = Recipe(target="ort", activation=TensorSpec(format="uint8"))
    planned = _planned(model, tmp_path / "attention.onnx", recipe)
    batches = attention_batches(3, 3)
    found = calibrate_onnx(
        planned.path, batches, format="uint8", target="ort", validate_batches=0
    ).scales
    assert "kt" in planned.plan.shared and found["k"].format == "uint8"
    candidates = {
        t: {
            "own": found[t],
            "wide": _shifted(found[t], 1.9, -7),
            "same": found[t],
            "narrow": _shifted(found[t], 0.4, 4),
        }
        for t in planned.plan.activations
    }
    views = _views(model, batches)
    scores = stacked_errors(planned, found, candidates, views, max_elements)
    want = gated_errors(planned, found, candidates, views)
    assert scores is not None and list(scores.errors["k"]) == ["own", "wide", "same", "narrow"]
    assert _flat(scores) == pytest.approx(want, rel=1e-6)
    assert all(e["same"] == e["own"] and len(set(e.values())) == 3 for e in scores.errors.values())


def test_a_float16_model_scores_as_the_gated_runs_up_to_float16_rounding(tmp_path):
    rng = np.random.default_rng(6)
    model = half_mlp(rng)
    planned = _planned(model, tmp_path / "half.onnx", Recipe(target="tensorrt"))
    batches = [{"x": rng.standard_t(3.0, (4, 3, 16)).astype(np.float16)} for _ in range(3)]
    found = calibrate_onnx(planned.path, batches, target="tensorrt", validate_batches=0).scales
    assert found["r"].format == "int8"
    candidates = {
        t: {"own": found[t], "half": dataclasses.replace(found[t], scale=found[t].scale / 2)}
        for t in planned.plan.activations
    }
    views = _views(model, batches)
    errors = _flat(stacked_errors(planned, found, candidates, views, UNBOUNDED))
    # ONNX Runtime's CPU divides a float16 QuantizeLinear's x by its scale in float32 in the
    # stacked model (as in the exported one) and in float16 inside the gated model's If (as the
    # ONNX reference evaluator does): the errors agree to float16 rounding
    assert errors == pytest.approx(gated_errors(planned, found, candidates, views), rel=0.05)
    assert errors[("x", "half")] > 10 * errors[("x", "own")]


def _transposed_model() -> onnx.ModelProto:
    """x[N,6,8] -> Transpose -> [6,N,8] -> MatMul -> Transpose back -> y[N,6,4]: the
    quantized MatMul input holds the samples along axis 1."""
    w = np.random.default_rng(2).standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["x"], ["t"], "to_seq", perm=[1, 0, 2]),
            helper.make_node("MatMul", ["t", "w"], ["m"], "mm"),
            helper.make_node("Transpose", ["m"], ["y"], "back", perm=[1, 0, 2]),
        ],
        "transposed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 4])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _fixed_reshape_model() -> onnx.ModelProto:
    """x[N,6,8] -> Reshape to [4, 48] -> MatMul -> y[4,4]: the batch is fixed inside."""
    w = np.random.default_rng(4).standard_normal((48, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape"], ["flat"], "flatten"),
            helper.make_node("MatMul", ["flat", "w"], ["y"], "mm"),
        ],
        "fixed_reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([4, 48]), "shape")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _none_and_why(caplog, planned, found, views) -> str:
    caplog.clear()
    candidates = {t: {"max": found[t]} for t in planned.plan.activations}
    with caplog.at_level(logging.INFO, logger="qcal_export.analysis.stacked_scoring"):
        assert stacked_errors(planned, found, candidates, views, UNBOUNDED) is None
    return " / ".join(r.getMessage() for r in caplog.records)


def test_fixed_batches_a_tensor_off_the_batch_axis_and_nvfp4_do_not_stack(tmp_path, caplog):
    path = make_mlp(tmp_path, seq=True) / "mlp.onnx"
    batches = heavy_batches((4, 5, 64), 2)
    found = calibrate_onnx(path, batches, format="int8", target="tensorrt", validate_batches=0)
    fixed = onnx.load(str(path))
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    planned = _planned(fixed, tmp_path / "fixed.onnx", Recipe(target="tensorrt"))
    assert "input 'x'" in _none_and_why(caplog, planned, found.scales, _views(fixed, batches))

    transposed = _transposed_model()
    planned = _planned(transposed, tmp_path / "transposed.onnx", Recipe(target="tensorrt"))
    data = heavy_batches((4, 6, 8), 2)
    scales = calibrate_onnx(planned.path, data, target="tensorrt", validate_batches=0).scales
    assert list(planned.plan.activations) == ["t"]
    why = _none_and_why(caplog, planned, scales, _views(transposed, data))
    assert "'t' is not sample-major" in why

    reshaped = _fixed_reshape_model()
    planned = _planned(reshaped, tmp_path / "reshaped.onnx", Recipe(target="tensorrt"))
    scales = calibrate_onnx(planned.path, data, target="tensorrt", validate_batches=0).scales
    assert "Reshape" in _none_and_why(caplog, planned, scales, _views(reshaped, data))

    nvfp4 = calibrate_onnx(path, batches, format="nvfp4", target="tensorrt", validate_batches=0)
    recipe = Recipe(target="tensorrt", activation=TensorSpec(format="nvfp4"))
    planned = _planned(onnx.load(str(path)), tmp_path / "nvfp4.onnx", recipe)
    why = _none_and_why(caplog, planned, nvfp4.scales, _views(planned.model, batches))
    assert "per-tensor QuantizeLinear" in why


def test_sample_major_check_allows_another_kernels_rounding_but_not_mixed_halves():
    rng = np.random.default_rng(7)
    single = rng.standard_normal((3, 5, 8)).astype(np.float32)
    rounded = single * np.float32(1 + 5e-4)  # a TF32 kernel of the larger batch, say
    assert _repeats(single, np.concatenate([rounded, rounded]))
    assert not _repeats(single, np.concatenate([rounded, single]))  # one run, halves apart
    off_axis = np.concatenate([single, single], axis=1).reshape(6, 5, 8)  # samples on axis 1
    assert not _repeats(single, off_axis)
    assert not _repeats(single, np.concatenate([single * 1.05, single * 1.05]))
    ids = rng.integers(0, 9, (3, 4))
    assert _repeats(ids, np.concatenate([ids, ids]))
    assert not _repeats(ids, np.concatenate([ids, ids + 1]))


def test_an_activation_off_the_batch_axis_is_gated_while_the_others_stack(
    tmp_path, monkeypatch, caplog
):
    rng = np.random.default_rng(11)
    constant = rng.uniform(0.2, 3.0, 16).astype(np.float32)  # no batch axis
    path = tmp_path / "constant_scale.onnx"
    onnx.save(constant_mul_mlp(constant, ["N", 16], 4, rng), str(path))
    batches = heavy_batches((8, 16), 3)
    monkeypatch.setattr(method_choice, "_on_cpu", lambda providers: False)  # as on a GPU
    stack = method_choice.stacked_errors

    def choice(stacking: bool) -> tuple[dict, StackedScores | None]:
        scored = []
        monkeypatch.setattr(
            method_choice,
            "stacked_errors",
            lambda *a: scored.append(stack(*a) if stacking else None) or scored[-1],
        )
        result = calibrate_onnx(
            path, batches, target="ort", method="auto", auto_samples=24, validate_batches=0
        )
        return result.report["method_choice"], scored[0]

    with caplog.at_level(logging.INFO, logger="qcal_export.analysis.stacked_scoring"):
        stacked, scores = choice(stacking=True)
    assert scores is not None and sorted(scores.errors) == ["h", "m", "x"]
    assert "1 activation(s) one run per candidate: tensor 'c' is not sample-major" in caplog.text
    gated, _ = choice(stacking=False)
    assert sorted(stacked) == sorted(gated) == ["c", "h", "m", "x"]
    for tensor, entry in gated.items():
        assert stacked[tensor]["picked"] == entry["picked"]
        assert stacked[tensor]["output_rel_l2"] == pytest.approx(entry["output_rel_l2"], rel=1e-5)

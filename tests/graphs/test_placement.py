"""Q/DQ placement per deployment target: which tensors get Q/DQ (against ONNX Runtime's own
quantize_static for ``ort``), scales shared through data-movement ops, the outputs against the
float model in ORT, and the integer kernels ORT's profiler shows it running."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
from placement_models import (
    attention_batches,
    attention_model,
    cnn_batches,
    cnn_model,
    residual_norm_batches,
    residual_norm_model,
)

from qcal_export import calibrate_onnx
from qcal_export.errors import RecipeError
from qcal_export.graphs.targets import find_targets
from qcal_export.spec.plan import Use
from qcal_export.spec.recipe import Recipe, TensorSpec, recipe_from_dict

CPU = ["CPUExecutionProvider"]
MODELS = {"cnn": (cnn_model, cnn_batches), "attention": (attention_model, attention_batches)}


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _quantized_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """Activation tensor -> the scale initializer its QuantizeLinear reads."""
    initializers = {t.name for t in model.graph.initializer}
    return {
        node.input[0]: node.input[1]
        for node in model.graph.node
        if node.op_type == "QuantizeLinear" and node.input[0] not in initializers
    }


def _planned(plan) -> set[str]:
    return set(plan.activations) | set(plan.shared)


@pytest.mark.parametrize("name", list(MODELS))
def test_ort_places_qdq_on_the_tensors_quantize_static_does(tmp_path, name):
    build, batches = MODELS[name]
    path = _save(build(), tmp_path / "float.onnx")
    quantize_static(
        str(path),
        str(tmp_path / "ort.onnx"),
        _Reader(batches()),
        quant_format=QuantFormat.QDQ,
        extra_options={"QDQKeepRemovableActivations": True},
    )
    theirs = _quantized_inputs(onnx.load(str(tmp_path / "ort.onnx")))
    # ORT also quantizes the graph output (its Q reads a renamed tensor); qcal keeps outputs float
    theirs = {t: s for t, s in theirs.items() if not t.endswith("_QuantizeLinear_Input")}
    plan = find_targets(build(), Recipe(target="ort"))
    assert _planned(plan) == set(theirs)
    # the same tensors share a scale: a data-movement output quantized with its input's
    ours_shared = {t: e.source for t, e in plan.shared.items()}
    theirs_shared = {t: s.removesuffix("_scale") for t, s in theirs.items() if s != f"{t}_scale"}
    assert ours_shared == theirs_shared


def test_ort_plan_of_the_cnn_tensor_by_tensor():
    plan = find_targets(cnn_model(), Recipe(target="ort"))
    assert set(plan.activations) == {"x", "t1", "r1", "t2", "a", "t3", "cat", "g"}
    assert {t: e.source for t, e in plan.shared.items()} == {"p": "a", "f": "g"}
    assert set(plan.weights) == {"w1", "w2", "w3", "wfc"}  # biases stay float
    # a conv's output is quantized for every reader, asked for by the conv
    assert set(plan.activations["t2"].uses) == {Use("add", 0), Use("add", 0, by="c2")}
    # the MaxPool output keeps a's scale for both its readers
    assert set(plan.shared["p"].uses) == {
        Use("c3", 0),
        Use("c3", 0, by="pool"),
        Use("concat", 0),
        Use("concat", 0, by="pool"),
    }
    assert "y" not in plan.activations  # the model's output stays float


def test_tensorrt_quantizes_compute_inputs_residual_adds_and_pooling_inputs():
    plan = find_targets(cnn_model(), Recipe(target="tensorrt"))
    # t2 (the conv output TensorRT fuses the Add into) and every other output stay float
    assert set(plan.activations) == {"x", "r1", "a", "p", "cat", "f"}
    assert plan.shared == {}
    assert Use("add", 1) in plan.activations["r1"].uses
    assert plan.activations["a"].uses == [Use("pool", 0)]
    assert plan.activations["cat"].uses == [Use("gap", 0)]
    attention = find_targets(attention_model(), Recipe(target="tensorrt"))
    assert set(attention.activations) == {"e", "q2", "kt", "pr"}
    assert set(attention.weights) == {"wq", "wk"}


def test_residual_add_through_batch_normalization_quantizes_the_other_branch():
    model = cnn_model()
    graph = model.graph
    bn = [
        onnx.numpy_helper.from_array(np.ones(8, np.float32) * v, f"bn{i}")
        for i, v in enumerate((1.0, 0.0, 0.0, 1.0))
    ]
    graph.initializer.extend(bn)
    graph.node.insert(
        3, onnx.helper.make_node("BatchNormalization", ["t2", *(t.name for t in bn)], ["t2n"], "bn")
    )
    next(n for n in graph.node if n.name == "add").input[:] = ["t2n", "r1"]
    plan = find_targets(model, Recipe(target="tensorrt"))
    assert "t2n" not in plan.activations
    assert Use("add", 1) in plan.activations["r1"].uses


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
def test_the_residual_stream_feeding_a_normalization_stays_float(target):
    plan = find_targets(residual_norm_model(), Recipe(target=target))
    assert plan.stream_nodes == (["bias", "residual"] if target == "ort" else [])
    # the compute ops' inputs stay quantized; the Adds read the float x and h
    assert plan.activations["x"].uses == [Use("dense", 0)]
    assert plan.activations["n"].uses == [Use("head", 0)]
    assert not {"h", "hb", "r"} & _planned(plan)
    if target == "ort":
        assert plan.activations["z"].uses == [Use("sigmoid", 0, by="head"), Use("sigmoid", 0)]
        assert (
            "2 Add node(s) of the residual stream feeding a normalization"
            in (plan.placement_notes[0])
        )


def test_a_float_residual_stream_keeps_the_outlier_channel_from_rounding_the_rest(tmp_path, caplog):
    path = _save(residual_norm_model(), tmp_path / "float.onnx")
    batches = residual_norm_batches()
    quantize_static(
        str(path), str(tmp_path / "static.onnx"), _Reader(batches), quant_format=QuantFormat.QDQ
    )
    with caplog.at_level(logging.INFO):
        result = calibrate_onnx(path, batches, output=tmp_path / "ort.onnx", target="ort")
    # what the target deliberately leaves float is a note of the report, not a warning
    stream = [n for n in result.report["plan_notes"] if "of the residual stream" in n]
    assert len(stream) == 1
    assert [r.levelname for r in caplog.records if r.getMessage() == stream[0]] == ["INFO"]
    feed = residual_norm_batches(count=1, batch=16)[0]
    expected = ort.InferenceSession(str(path), providers=CPU).run(None, feed)[0]
    errors = {
        name: np.abs(
            ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=CPU).run(None, feed)[0]
            - expected
        ).max()
        for name in ("static", "ort")
    }
    # quantize_static's one scale over the stream (channel 0 near 100, the rest near 1) rounds
    # the other channels to a few levels; kept float, only the compute ops' inputs round
    assert errors["ort"] < 0.01 < errors["static"]
    assert errors["static"] > 4 * errors["ort"]


def test_block_and_weight_only_formats_keep_to_the_compute_ops():
    nvfp4 = TensorSpec(format="nvfp4")
    recipe = Recipe(activation=nvfp4, weight=nvfp4, exclude_nodes=("pv",), target="ort")
    plan = find_targets(attention_model(), recipe)
    assert set(plan.activations) == {"e", "q2", "kt"} and plan.shared == {}
    weight_only = Recipe(activation=None, weight=TensorSpec(format="int4"), target="ort")
    plan = find_targets(attention_model(), weight_only)
    assert plan.activations == {} and set(plan.weights) == {"wq", "wk"}


def test_target_is_a_recipe_field_checked_before_anything_runs():
    assert Recipe().target == "ort"  # see recipe.DEFAULT_TARGET for why
    assert recipe_from_dict({"target": "tensorrt"}).target == "tensorrt"
    with pytest.raises(RecipeError, match=r"target must be one of \['ort', 'tensorrt'\]"):
        recipe_from_dict({"target": "trt"})


def _calibrate(tmp_path: Path, name: str, target: str, **options):
    build, batches = MODELS[name]
    path = _save(build(), tmp_path / f"{name}.onnx")
    out = tmp_path / f"{name}_{target}.onnx"
    result = calibrate_onnx(
        path, batches(), output=out, target=target, activation_format="uint8", **options
    )
    return path, out, result


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
@pytest.mark.parametrize("name", list(MODELS))
def test_placed_models_track_the_float_model_in_ort(tmp_path, name, target):
    path, out, result = _calibrate(tmp_path, name, target)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    validation = result.report["validation"]
    assert validation["runtime_issue"] is None  # ORT's default level agrees with the reference
    feed = MODELS[name][1](count=1, batch=8)[0]
    expected = ort.InferenceSession(str(path), providers=CPU).run(None, feed)[0]
    got = ort.InferenceSession(str(out), providers=CPU).run(None, feed)[0]
    cosine = float(np.sum(expected * got) / np.linalg.norm(expected) / np.linalg.norm(got))
    assert cosine > 0.999
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


def test_shared_tensors_reuse_the_source_scale_and_are_calibrated_once(tmp_path):
    _, out, result = _calibrate(tmp_path, "attention", "ort")
    model = onnx.load(str(out))
    scales = _quantized_inputs(model)
    assert scales["kt"] == scales["k"]
    table_dq = next(
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0].startswith("table")
    )
    assert scales["e"] == table_dq.input[1]  # the embedding rows keep the table's scale
    assert "kt" not in result.scales and "e" not in result.scales
    assert result.report["shared_scales"] == {"e": "table", "kt": "k"}
    assert result.report["target"] == "ort"


def test_ort_form_runs_integer_kernels_on_the_cnn(tmp_path):
    _, _, ort_run = _calibrate(tmp_path, "cnn", "ort")
    section = ort_run.report["deployment"]
    kernels = section["integer_kernels"]
    for op in ("QLinearConv", "QLinearAdd", "QLinearConcat", "QLinearGlobalAveragePool"):
        assert op in kernels, section["kernels"]
    assert kernels["QLinearConv"] == 3
    assert section["float"]["file_bytes"] > 0 and section["quantized"]["file_bytes"] > 0
    assert set(section["float"]) == set(section["quantized"]) == {"latency_ms", "file_bytes"}
    _, _, trt_run = _calibrate(tmp_path, "cnn", "tensorrt")
    # TensorRT's placement leaves the Add, Concat and pooling to run in float on the CPU
    assert set(trt_run.report["deployment"]["integer_kernels"]) <= {"QLinearConv"}


def test_ort_form_runs_integer_kernels_on_attention(tmp_path):
    _, _, result = _calibrate(tmp_path, "attention", "ort")
    kernels = result.report["deployment"]["integer_kernels"]
    assert {"QLinearAdd", "QLinearMul", "QLinearSoftmax", "QLinearSigmoid"} <= set(kernels)
    assert any(op in kernels for op in ("QLinearMatMul", "MatMulIntegerToFloat")), kernels

"""The stacked model: each activation's Q -> DQ (and its sharers') per slot along the batch axis.

A run over a view tiled once per slot: a shut slot's rows are the float model's bit for bit, and
a slot that opens one activation at given scale inputs is, on its rows, the export of a plan
quantizing that activation (and the tensors sharing its scale) alone at those scales, weights
float, in ONNX Runtime with its optimizations off (float16 models in the ONNX reference
evaluator: ONNX Runtime's CPU runs float16 MatMuls in float32 and drops the casts between them
where no Q/DQ sits, so a float16 graph rounds where its Q/DQ regions are). Anything but a
per-tensor Q -> DQ pair, or an opset without per-axis QuantizeLinear, is not stackable.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mlp import half_mlp, make_mlp
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from placement_models import attention_batches, attention_model

from qcal_export import calibrate_onnx
from qcal_export.graphs.export import export_qdq
from qcal_export.graphs.stacked import NotStackable, stack_activations
from qcal_export.graphs.targets import find_targets
from qcal_export.spec.recipe import Recipe, TensorSpec


def _runner(model: onnx.ModelProto, half: bool) -> ort.InferenceSession | ReferenceEvaluator:
    return ReferenceEvaluator(model) if half else _session(model)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _mlp(tmp_path):
    path = make_mlp(tmp_path, seq=True) / "mlp.onnx"
    rng = np.random.default_rng(3)
    batches = [{"x": rng.standard_t(3.0, (3, 5, 64)).astype(np.float32)} for _ in range(2)]
    return onnx.load(str(path)), Recipe(target="tensorrt"), batches, "int8"


def _attention(tmp_path):
    recipe = Recipe(target="ort", activation=TensorSpec(format="uint8"))
    return attention_model(), recipe, attention_batches(2, 3), "uint8"


def _relu_fp8(tmp_path):
    """x -> Relu -> MatMul: an fp8 activation after a Relu, whose QuantizeLinear has no zero
    point (``output_dtype``, opset 21)."""
    rng = np.random.default_rng(5)
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], "relu"),
            helper.make_node("MatMul", ["r", "w"], ["y"], "mm"),
        ],
        "relu_fp8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6])],
        [numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    batches = [{"x": rng.standard_normal((3, 4, 8)).astype(np.float32)} for _ in range(2)]
    return model, Recipe(target="tensorrt", activation=TensorSpec(format="fp8")), batches, "fp8"


def _half(tmp_path):
    """A float16 MLP: x -> MatMul -> Relu -> MatMul, float16 scales."""
    rng = np.random.default_rng(6)
    model = half_mlp(rng)
    batches = [{"x": rng.standard_t(3.0, (3, 3, 16)).astype(np.float16)} for _ in range(2)]
    return model, Recipe(target="tensorrt"), batches, "int8"


def _activations_only(plan, tensors=None):
    """``plan`` quantizing the activations ``tensors`` (all: None) and their sharers, no weights."""
    keep = set(plan.activations) if tensors is None else set(tensors)
    return dataclasses.replace(
        plan,
        activations={t: a for t, a in plan.activations.items() if t in keep},
        weights={},
        shared={t: s for t, s in plan.shared.items() if plan.root(t) in keep},
    )


def _other(scales, factor: float, shift: int):
    """``scales`` with the scale times ``factor`` and, where asymmetric, zero point + ``shift``."""
    zero = scales.zero_point
    if scales.format == "uint8":
        zero = (zero + shift).clamp(0, 255)
    return dataclasses.replace(scales, scale=scales.scale * factor, zero_point=zero)


def _slot_values(stacked, scales, tensor) -> dict[str, np.ndarray]:
    """The scale inputs of ``scales`` for ``tensor``'s per-slot inputs (scalars)."""
    q = scales.qparams()
    scale_name, zero_name = stacked.params[tensor]
    values = {scale_name: q.scale.numpy().reshape(()).astype(stacked.defaults[scale_name].dtype)}
    if zero_name in stacked.inputs:
        zero = q.fmt.encode_zero_point(q.zero_point).numpy().reshape(())
        values[zero_name] = zero.astype(stacked.defaults[zero_name].dtype)
    return values


def _feed(stacked, view, opened: list[tuple[str, dict]]) -> dict[str, np.ndarray]:
    """Slot 0 shut, slot k opening ``opened[k-1]`` (activation, its per-slot values)."""
    count = len(opened) + 1
    feed = {n: np.concatenate([v] * count) for n, v in view.items()}
    feed |= {o: np.zeros(count, dtype=bool) for o in stacked.opens.values()}
    feed |= {i: np.repeat(stacked.defaults[n][None], count) for n, i in stacked.inputs.items()}
    for k, (tensor, values) in enumerate(opened, start=1):
        feed[stacked.opens[tensor]][k] = True
        for name, value in values.items():
            feed[stacked.inputs[name]][k] = value
    return feed


@pytest.mark.parametrize("build", [_mlp, _attention, _relu_fp8, _half])
def test_shut_slots_are_float_and_an_open_slot_is_its_activation_alone(build, tmp_path):
    model, recipe, batches, fmt = build(tmp_path)
    onnx.save(model, str(tmp_path / "float.onnx"))
    kind = recipe.target
    scales = calibrate_onnx(
        tmp_path / "float.onnx", batches, format=fmt, target=kind, validate_batches=0
    ).scales
    plan = find_targets(model, recipe)
    narrowed = _activations_only(plan)
    exported = export_qdq(_copy(model), narrowed, scales, "quantized")
    stacked = stack_activations(exported.model, narrowed, exported.activation_params)
    assert stacked.tensors == list(plan.activations)
    assert set(plan.shared) - {"e"} <= set(stacked.sources)  # e shares a weight's scale
    inputs = {i.name for i in stacked.model.graph.input}
    qs = [n for n in stacked.model.graph.node if n.op_type == "QuantizeLinear"]
    assert qs and all(n.input[1] in inputs for n in qs)  # every pair reads per-slot scales
    if fmt == "fp8":
        assert exported.opset_to == 21 and all(len(n.input) == 2 for n in qs)
    half = model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    session, float_model = _runner(stacked.model, half), _runner(model, half)
    others = {t: _other(scales[t], 1.7, 5) for t in stacked.tensors}
    opened = [(t, _slot_values(stacked, s, t)) for t, s in others.items()]
    opened += [(t, _slot_values(stacked, scales[t], t)) for t in stacked.tensors]
    count = len(opened) + 1
    for view in batches:
        tiled = {name: np.concatenate([value] * count) for name, value in view.items()}
        got = _split(session.run(None, _feed(stacked, view, opened)), count)
        for part, want in zip(got, _split(float_model.run(None, tiled), count), strict=True):
            np.testing.assert_array_equal(part[0], want[0])
        for k, (tensor, _) in enumerate(opened, start=1):
            used = others if k <= len(others) else scales
            alone = _activations_only(plan, [tensor])
            one = export_qdq(_copy(model), alone, {**scales, tensor: used[tensor]}, "quantized")
            wants = _split(_runner(one.model, half).run(None, tiled), count)
            for part, want in zip(got, wants, strict=True):
                np.testing.assert_array_equal(part[k], want[k])
            assert not np.array_equal(got[0][k], got[0][0])


def _split(outputs: list[np.ndarray], count: int) -> list[list[np.ndarray]]:
    """Each output's ``count`` slots along axis 0."""
    return [np.split(output, count) for output in outputs]


def _opset_11_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], "mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(np.ones((4, 2), np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


def test_what_is_not_a_per_tensor_pair_at_a_per_axis_opset_does_not_stack(tmp_path):
    model, recipe, batches, fmt = _mlp(tmp_path)
    onnx.save(model, str(tmp_path / "float.onnx"))
    scales = calibrate_onnx(
        tmp_path / "float.onnx", batches, format=fmt, target="tensorrt", validate_batches=0
    ).scales
    narrowed = _activations_only(find_targets(model, recipe))
    exported = export_qdq(_copy(model), narrowed, scales, "quantized")
    read_elsewhere = _copy(exported.model)
    scale = exported.activation_params["x"][0]
    read_elsewhere.graph.node.append(helper.make_node("Identity", [scale], ["seen"], "peek"))
    with pytest.raises(NotStackable, match="peek"):
        stack_activations(read_elsewhere, narrowed, exported.activation_params)
    with pytest.raises(NotStackable, match="per-tensor"):
        stack_activations(_copy(exported.model), narrowed, {**exported.activation_params, "x": []})
    old = _opset_11_model()
    old_plan = _activations_only(find_targets(old, Recipe(target="tensorrt")))
    old_scales = {"x": scales["x"]}
    exported = export_qdq(old, old_plan, old_scales, "quantized")
    assert exported.opset_to == 11
    with pytest.raises(NotStackable, match="opset 11"):
        stack_activations(exported.model, old_plan, exported.activation_params)

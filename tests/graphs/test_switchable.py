"""The switchable model under ``--target ort``: every placed Q/DQ is switched, one switch per
unit (a shared-scale group together). All off is the float model bit for bit, all on the
exported QDQ model, and any one unit off is the export of the plan without that unit, in ORT
with its optimizations off (the switches keep Q/DQ as float ops)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from placement_models import attention_batches, attention_model, cnn_batches, cnn_model

from qcal_export import calibrate_onnx
from qcal_export.artifacts.scales import load_scales
from qcal_export.graphs.export import export_qdq
from qcal_export.graphs.switchable import (
    ENABLE,
    GROUP,
    switch_units,
    switchable_model,
    without_units,
)
from qcal_export.graphs.targets import find_targets
from qcal_export.spec.recipe import Recipe
from qcal_export.validation.output_error import ErrorTally

MODELS = {"cnn": (cnn_model, cnn_batches), "attention": (attention_model, attention_batches)}


def _session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


@pytest.fixture(scope="module", params=list(MODELS))
def calibrated(request, tmp_path_factory):
    build, batches = MODELS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    model = build()
    onnx.save(model, str(path / "float.onnx"))
    calibrate_onnx(
        path / "float.onnx",
        batches(),
        target="ort",
        output=path / "q.onnx",
        scales=path / "q.safetensors",
        validate_batches=0,
    )
    scales, _ = load_scales(path / "q.safetensors")
    plan = find_targets(model, Recipe(target="ort"))
    return request.param, model, plan, scales, path


def _switchable(model, plan, scales):
    exported = export_qdq(_copy(model), plan, scales, "quantized").model
    return switchable_model(model, exported, plan)


def _outputs(session: ort.InferenceSession, feed: dict, enable: np.ndarray | None = None):
    extra = {} if enable is None else {ENABLE: enable}
    return session.run(None, {**feed, **extra})


def test_all_off_is_the_float_model_and_all_on_the_exported_one(calibrated):
    name, model, plan, scales, path = calibrated
    switched = _switchable(model, plan, scales)
    session = _session(switched.model)
    float_model, exported = _session(model), _session(str(path / "q.onnx"))
    count = len(switched.units)
    for feed in MODELS[name][1](3):
        off = _outputs(session, feed, np.zeros(count, dtype=bool))
        on = _outputs(session, feed, np.ones(count, dtype=bool))
        for got, want in zip(off, _outputs(float_model, feed), strict=True):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(on, _outputs(exported, feed), strict=True):
            np.testing.assert_array_equal(got, want)
        assert not np.array_equal(on[0], off[0])


def test_every_placed_qdq_is_one_units_slot_and_groups_switch_together(calibrated):
    name, _, plan, _, _ = calibrated
    units = switch_units(plan)
    slots = [(s.node, s.index) for unit in units.values() for s in unit]
    entries = [*plan.activations.values(), *plan.weights.values(), *plan.shared.values()]
    assert sorted(slots) == sorted({(u.node, u.index) for e in entries for u in e.uses})
    groups = {unit: {s.tensor for s in found} for unit, found in units.items()}
    groups = {unit: tensors for unit, tensors in groups.items() if unit.startswith(GROUP)}
    expected = {
        "cnn": {GROUP + "a": {"a", "p"}, GROUP + "g": {"g", "f"}},
        "attention": {GROUP + "table": {"table", "e"}, GROUP + "k": {"k", "kt"}},
    }
    assert groups == expected[name]
    # a conv's output read by a float Relu is switched with the conv that placed it
    if name == "cnn":
        assert {(s.node, s.tensor) for s in units["c1"]} == {
            ("c1", "x"),
            ("c1", "w1"),
            ("relu", "t1"),
        }


def test_one_unit_off_is_the_export_of_the_plan_without_it(calibrated):
    name, model, plan, scales, _ = calibrated
    switched = _switchable(model, plan, scales)
    session = _session(switched.model)
    feed = MODELS[name][1](1)[0]
    for position, unit in enumerate(switched.units):
        enable = np.ones(len(switched.units), dtype=bool)
        enable[position] = False
        narrowed = without_units(plan, switched.units, {unit})
        used = {*narrowed.activations, *narrowed.weights}
        kept = {t: s for t, s in scales.items() if t in used}
        exported = export_qdq(_copy(model), narrowed, kept, "quantized").model
        got = _outputs(session, feed, enable)
        for mine, theirs in zip(got, _outputs(_session(exported), feed), strict=True):
            np.testing.assert_array_equal(mine, theirs, err_msg=unit)


def test_precision_search_leaves_a_scale_group_float_and_the_export_follows(tmp_path):
    model = cnn_model()
    onnx.save(model, str(tmp_path / "float.onnx"))
    result = calibrate_onnx(
        tmp_path / "float.onnx",
        cnn_batches(12),
        target="ort",
        target_cosine=0.99999,
        output=tmp_path / "q.onnx",
        validate_batches=2,
    )
    rows = {row["node"]: row for row in result.report["layers"]}
    assert set(rows[GROUP + "a"]["activation_sqnr_db"]) == {"a", "p"}
    assert set(rows[GROUP + "g"]["activation_sqnr_db"]) == {"g", "f"}
    precision = result.report["precision"]
    floats = [entry["node"] for entry in precision["float_nodes"]]
    assert GROUP + "g" in floats
    assert precision["heldout_switchable"]["cosine"] >= 0.99999
    written = onnx.load(str(tmp_path / "q.onnx"))
    quantized = {n.input[0] for n in written.graph.node if n.op_type == "QuantizeLinear"}
    assert not {"g", "f"} & quantized
    assert {"a", "p"} <= quantized or GROUP + "a" in floats


def test_fp8_after_a_relu_keeps_no_zero_point_and_still_switches(tmp_path):
    """fp8 at ``--target ort``: the activation after a Relu is written without a zero point
    (opset 21); the per-layer view builds its switchable form over it and, all switches on,
    gives the exported model's own error."""
    model = cnn_model()
    onnx.save(model, str(tmp_path / "float.onnx"))
    result = calibrate_onnx(
        tmp_path / "float.onnx",
        cnn_batches(6),
        format="fp8",
        target="ort",
        layer_view=True,
        view_batches=6,
        output=tmp_path / "q.onnx",
        validate_batches=0,
    )
    exported = onnx.load(str(tmp_path / "q.onnx"))
    relu = next(n.output[0] for n in exported.graph.node if n.op_type == "Relu")
    (quantize,) = [
        n for n in exported.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == relu
    ]
    assert len(quantize.input) == 2  # no zero point
    reference, candidate = (
        _session(str(tmp_path / "float.onnx")),
        _session(str(tmp_path / "q.onnx")),
    )
    error = ErrorTally([o.name for o in reference.get_outputs()])
    for feed in cnn_batches(6):
        error.add(reference.run(None, feed), candidate.run(None, feed))
    all_on = result.report["layer_view"]["all_quantized"]
    assert all_on["rel_l2"] == pytest.approx(error.worst()["rel_l2"], rel=1e-4)

"""The gated model over NVFP4 activations: each gate moves the activation's in-graph block
scales and FP4 round trip (as the exact emulation computes them) behind an ``If``. All gates
shut is the float model bit for bit; one gate open is the emulation of the export quantizing
that activation alone; a fed global scale acts as that export's own initializer would."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from mlp import make_mlp
from test_gated import _activations_only, _alone
from test_switchable import _copy, _session

from qcal_export import calibrate_onnx
from qcal_export.artifacts.scales import load_scales
from qcal_export.errors import RecipeError
from qcal_export.graphs.export import export_qdq
from qcal_export.graphs.fp4_emulation import emulate_fp4, runnable_form
from qcal_export.graphs.gated import GATE, gate_activations
from qcal_export.graphs.targets import find_targets
from qcal_export.spec.recipe import Recipe, TensorSpec


def _batches(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"x": rng.standard_t(3.0, (4, 5, 64)).astype(np.float32)} for _ in range(count)]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    path = make_mlp(tmp_path_factory.mktemp("mlp"), seq=True)
    calibrate_onnx(
        path / "mlp.onnx",
        _batches(3),
        format="nvfp4",
        output=path / "q.onnx",
        scales=path / "q.safetensors",
        validate_batches=0,
    )
    scales, _ = load_scales(path / "q.safetensors")
    model = onnx.load(str(path / "mlp.onnx"))
    return model, find_targets(model, Recipe(TensorSpec("nvfp4"), weight=None)), scales


def _emulated_alone(model, plan, scales, tensor):
    exported = export_qdq(_copy(model), _alone(plan, tensor), scales, "quantized").model
    return emulate_fp4(exported).model


def _gated(model, plan, scales):
    exported = export_qdq(_copy(model), _activations_only(plan), scales, "quantized")
    runnable = runnable_form(exported.model)
    assert runnable is not None and runnable is not exported.model  # FP4: the emulation
    return gate_activations(runnable, _activations_only(plan), exported.activation_params)


def test_shut_gates_are_the_float_model_and_one_open_gate_that_activations_emulation(calibrated):
    model, plan, scales = calibrated
    gated = _gated(model, plan, scales)
    assert gated.tensors == list(plan.activations) and len(gated.tensors) == 3
    ifs = [n for n in gated.model.graph.node if n.op_type == "If"]
    then = [next(a.g for a in n.attribute if a.name == "then_branch") for n in ifs]
    assert len(ifs) == 3 and all(len(branch.node) > 2 for branch in then)  # whole chains
    session, float_model = _session(gated.model), _session(model)
    for feed in _batches(2):
        shut = np.zeros(len(gated.tensors), dtype=bool)
        got, want = session.run(None, {**feed, GATE: shut}), float_model.run(None, feed)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
        for k, tensor in enumerate(gated.tensors):
            gate = np.eye(len(gated.tensors), dtype=bool)[k]
            got = session.run(None, {**feed, GATE: gate})
            want = _session(_emulated_alone(model, plan, scales, tensor)).run(None, feed)
            assert not np.array_equal(got[0], float_model.run(None, feed)[0])
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, w)


def test_a_fed_global_scale_acts_as_the_exports_own(calibrated):
    model, plan, scales = calibrated
    gated = _gated(model, plan, scales)
    session = _session(gated.model)
    tensor = gated.tensors[1]
    (global_name,) = gated.scales[tensor]
    assert global_name == f"{tensor}_global_scale"
    own = scales[tensor]
    smaller = dataclasses.replace(
        own, amax=own.amax * 0.3, scale=own.scale * 0.3, global_scale=own.global_scale * 0.3
    )
    fed = smaller.qparams().global_scale.numpy().astype(np.float32).reshape(())
    assert not torch.equal(smaller.qparams().global_scale, own.qparams().global_scale)
    alone = _emulated_alone(model, plan, {**scales, tensor: smaller}, tensor)
    gate = np.array([t == tensor for t in gated.tensors])
    for feed in _batches(2):
        got = session.run(None, {**feed, GATE: gate, global_name: fed})
        want = _session(alone).run(None, feed)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


def test_a_tensor_of_the_chain_read_outside_it_is_refused_naming_the_activation(calibrated):
    model, plan, scales = calibrated
    narrowed = _activations_only(plan)
    exported = export_qdq(_copy(model), narrowed, scales, "quantized")
    runnable = runnable_form(exported.model)
    tensor = next(iter(narrowed.activations))
    inner = next(n for n in runnable.graph.node if n.input and n.input[0] == tensor)
    runnable.graph.node.append(onnx.helper.make_node("Identity", [inner.output[0]], ["leak"]))
    runnable.graph.output.append(onnx.helper.make_tensor_value_info("leak", 1, None))
    with pytest.raises(RecipeError, match=f"cannot gate activation '{tensor}'"):
        gate_activations(runnable, narrowed, exported.activation_params)

"""The gated model under ``--target ort``: one gate per activation over its Q -> DQ and those of
the tensors sharing its scale. All gates shut is the float model bit for bit; one gate open is
the export of a plan quantizing that activation (and its sharers) alone, weights float; a run
may feed another scale and zero point, which then act as that export's initializers would."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from test_switchable import MODELS, _copy, _session
from test_switchable import calibrated as calibrated

from qcal_export.graphs.export import export_qdq
from qcal_export.graphs.gated import GATE, gate_activations


def _alone(plan, tensor: str):
    """``plan`` quantizing ``tensor`` and the tensors sharing its scale, no weights."""
    return dataclasses.replace(
        plan,
        activations={tensor: plan.activations[tensor]},
        weights={},
        shared={t: s for t, s in plan.shared.items() if plan.root(t) == tensor},
    )


def _activations_only(plan):
    """``plan`` without its weights and the tensors sharing a weight's scale."""
    shared = {t: s for t, s in plan.shared.items() if plan.root(t) in plan.activations}
    return dataclasses.replace(plan, weights={}, shared=shared)


def _gated(model, plan, scales):
    exported = export_qdq(_copy(model), _activations_only(plan), scales, "quantized")
    return gate_activations(exported.model, _activations_only(plan), exported.activation_params)


def test_shut_gates_are_the_float_model_and_one_open_gate_that_activation_alone(calibrated):
    name, model, plan, scales, _ = calibrated
    gated = _gated(model, plan, scales)
    assert gated.tensors == list(plan.activations)
    assert any(plan.shared) or name == "cnn"  # the attention model shares scales (Transpose)
    session, float_model = _session(gated.model), _session(model)
    for feed in MODELS[name][1](2):
        shut = np.zeros(len(gated.tensors), dtype=bool)
        got = session.run(None, {**feed, GATE: shut})
        for g, w in zip(got, float_model.run(None, feed), strict=True):
            np.testing.assert_array_equal(g, w)
        for k, tensor in enumerate(gated.tensors):
            alone = export_qdq(_copy(model), _alone(plan, tensor), scales, "quantized").model
            gate = np.eye(len(gated.tensors), dtype=bool)[k]
            got = session.run(None, {**feed, GATE: gate})
            want = _session(alone).run(None, feed)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, w)


def test_a_fed_scale_and_zero_point_act_as_the_exports_own(calibrated):
    name, model, plan, scales, _ = calibrated
    gated = _gated(model, plan, scales)
    session = _session(gated.model)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in gated.model.graph.initializer}
    tensor = next(t for t in gated.tensors if scales[t].format == "uint8")
    scale_name, zero_name = gated.scales[tensor]
    assert zero_name is not None  # uint8: asymmetric, the zero point is fed too
    own = scales[tensor]
    wider = dataclasses.replace(own, scale=own.scale * 1.7, zero_point=(own.zero_point + 3) % 256)
    assert not torch.equal(wider.zero_point, own.zero_point)
    q = wider.qparams()
    feed_scales = {
        scale_name: q.scale.numpy()
        .astype(inits[scale_name].dtype)
        .reshape(inits[scale_name].shape),
        zero_name: q.fmt.encode_zero_point(q.zero_point).numpy().astype(inits[zero_name].dtype),
    }
    alone = export_qdq(_copy(model), _alone(plan, tensor), {**scales, tensor: wider}, "quantized")
    gate = np.array([t == tensor for t in gated.tensors])
    for feed in MODELS[name][1](2):
        got = session.run(None, {**feed, GATE: gate, **feed_scales})
        want = _session(alone.model).run(None, feed)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    with pytest.raises(Exception, match=GATE):
        session.run(None, dict(MODELS[name][1](1)[0]))

"""Method auto for NVFP4 activations against the choice worked out by hand, in ONNX Runtime.

An NVFP4 activation's calibrated value is its global amax (the graph computes its block scales
from each block's amax); auto chooses it among max, percentile and entropy (hist-mse chooses
per-tensor scales only). The exhaustive choice builds, per activation and candidate, the float
model with that activation alone quantized by hand (``insert_activation_nvfp4`` before its
quantized readers, at that candidate's global scale), runs its exact FP4 emulation, and scores
the graph output against float, sample by sample; the race is worked out from those errors
(``raced_choice``). The run's scoring (gated emulation, global scale fed, the
activations gated all in one session or one per session) must pick the same candidate and give
every candidate's error over its samples.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from mlp import make_mlp
from onnx import TensorProto, shape_inference
from test_layer_view import plain_session
from test_method_choice import batch_errors, mixed_batches, raced_choice, single_samples

from qcal_export import calibrate_onnx
from qcal_export.analysis import auto_race, method_choice
from qcal_export.calibrate.runtime_scales import RUNTIME_NOTE
from qcal_export.graphs.fp4_emulation import emulate_fp4
from qcal_export.graphs.nvfp4 import insert_activation_nvfp4
from qcal_export.graphs.qdq import Names, raise_opset, sort_nodes
from qcal_export.spec.formats import NVFP4
from qcal_export.spec.plan import ActivationPlan, Blocks, Use
from qcal_export.spec.recipe import TensorSpec

CANDIDATES = ("max", "percentile", "entropy")
OPTIONS = {"max_clipped": 0.01, "percentile": 99.0}  # candidates apart on small batches


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return make_mlp(tmp_path_factory.mktemp("mlp"), seq=True) / "mlp.onnx"


def method_scales(mlp, batches) -> dict[str, dict]:
    """Every tensor's scales calibrated by each single candidate method."""
    taken = {"entropy": {"max_clipped": 0.01}, "percentile": {"percentile": 99.0}}
    return {
        method: calibrate_onnx(
            mlp,
            batches,
            format="nvfp4",
            method=method,
            method_options=taken.get(method, {}),
            validate_batches=0,
        ).scales
        for method in CANDIDATES
    }


def alone_model(mlp, tensor: str, scales, readers: set[str], path):
    """The float model with ``tensor`` quantized to NVFP4 (blocks along its last axis) for its
    ``readers`` only, as its FP4 emulation."""
    model = raise_opset(onnx.load(str(mlp)), NVFP4.min_opset)
    dims = {
        v.name: [d.dim_value or None for d in v.type.tensor_type.shape.dim]
        for v in [*shape_inference.infer_shapes(model).graph.value_info, *model.graph.input]
    }[tensor]
    uses = [
        Use(n.name, i)
        for n in model.graph.node
        if n.name in readers
        for i, name in enumerate(n.input)
        if name == tensor
    ]
    blocks = Blocks(len(dims) - 1, len(dims), dims[-1])
    plan = ActivationPlan(tensor, TensorSpec("nvfp4"), TensorProto.FLOAT, uses, blocks)
    insert_activation_nvfp4(model.graph, plan, scales.qparams(), Names(model.graph), "portable")
    sort_nodes(model.graph)
    onnx.checker.check_model(model, full_check=True)
    emulation = emulate_fp4(model)
    assert not emulation.unexpressed and emulation.emulated_activations == 1
    onnx.save(emulation.model, str(path))
    return path


@pytest.mark.parametrize("per_session", [16, 1])
def test_nvfp4_gated_scoring_picks_the_worked_out_choice(mlp, tmp_path, monkeypatch, per_session):
    monkeypatch.setattr(method_choice, "GATES_PER_SESSION", per_session)
    monkeypatch.setattr(auto_race, "INDIFFERENCE", 0.0)  # every race runs out
    batches = mixed_batches(6)
    samples = single_samples(batches)
    result = calibrate_onnx(
        mlp,
        batches,
        format="nvfp4",
        method="auto",
        method_options=OPTIONS,
        auto_samples=4 * len(batches),
        validate_batches=0,
    )
    choice = result.report["method_choice"]
    assert len(choice) == 3
    quantized = set(result.report["quantized_nodes"])
    scales = method_scales(mlp, batches)
    reference = plain_session(mlp)
    nodes = onnx.load(str(mlp)).graph.node
    distinct = set()
    for tensor, entry in choice.items():
        errors = entry["output_rel_l2"]
        assert list(errors) == list(CANDIDATES)  # hist-mse is no candidate for nvfp4
        readers = {n.name for n in nodes if n.name in quantized and tensor in n.input}
        per_sample = {}
        for method in CANDIDATES:
            path = tmp_path / f"{tensor.strip('/')}_{method}.onnx"
            alone = alone_model(mlp, tensor, scales[method][tensor], readers, path)
            per_sample[method] = batch_errors(reference, plain_session(alone), samples)
        picked, relative, counts = raced_choice(per_sample, auto_race.SCREEN_MARGIN)
        for method in CANDIDATES:
            assert errors[method] == pytest.approx(relative[method], rel=1e-4), method
        assert entry["samples"] == counts
        assert entry["picked"] == picked, (tensor, relative)
        distinct |= set(np.round(list(relative.values()), 6))
    assert len(distinct) > 3  # the candidates' errors differ
    picked = {t: c["picked"] for t, c in choice.items()}
    assert {t: result.scales[t].method for t in choice} == picked
    for tensor, method in picked.items():
        assert np.array_equal(result.scales[tensor].amax, scales[method][tensor].amax)


def test_mx_activations_have_nothing_to_choose_and_their_records_say_so(mlp):
    result = calibrate_onnx(
        mlp, mixed_batches(2), format="mxfp8", method="auto", validate_batches=0
    )
    assert "method_choice" not in result.report
    activations = [e for e in result.report["tensors"] if e["kind"] == "activation"]
    assert len(activations) == 3
    for entry in activations:
        assert entry["notes"] == [RUNTIME_NOTE], entry["tensor"]

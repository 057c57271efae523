"""The per-layer view and the precision search on a real exported MLP, against brute force.

Each node's sensitivity from the one switchable session must equal the output error of a model
exported with only that node quantized (run in ONNX Runtime with its Q/DQ kept as separate
float ops, as the switches keep them); an activation's SQNR must equal numpy's Q -> DQ of the
float activation; the precision choice must meet its target on the held-out batches, be
minimal (any float node quantized again misses it) and leave those batches out of calibration.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mlp import make_mlp
from onnx.reference import ReferenceEvaluator

from qcal_export.artifacts.scales import load_scales
from qcal_export.capture.data import open_data, split_holdout
from qcal_export.errors import DataError, RecipeError
from qcal_export.pipeline.calibrate import calibrate_onnx
from qcal_export.validation.output_error import ErrorTally


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return make_mlp(tmp_path_factory.mktemp("mlp"), seq=True) / "mlp.onnx"


def heavy_batches(count: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_t(2.5, (4, 5, 64)).astype(np.float32)} for _ in range(count)]


def plain_session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def output_error(reference, candidate, batches) -> dict[str, float]:
    error = ErrorTally(["y"])
    for batch in batches:
        error.add(reference.run(["y"], batch), candidate.run(["y"], batch))
    return error.worst()


def reexported(mlp, batches, scales, exclude, path):
    """The model re-exported from saved ``scales`` with the nodes ``exclude`` left in float."""
    calibrate_onnx(
        mlp,
        batches,
        format="int8",
        target="tensorrt",
        scales_in=scales,
        exclude=exclude,
        output=path,
        validate_batches=0,
    )
    return path


def test_each_nodes_sensitivity_is_that_of_a_model_quantizing_only_it(mlp, tmp_path):
    """At target tensorrt (the three MatMuls, int8 activations: the SQNR oracle's grid)."""
    batches = heavy_batches(3)
    scales = tmp_path / "s.safetensors"
    result = calibrate_onnx(
        mlp,
        batches,
        format="int8",
        target="tensorrt",
        layer_view=True,
        view_batches=3,
        scales=scales,
        validate_batches=0,
    )
    rows = {row["node"]: row for row in result.report["layers"]}
    assert len(rows) == 3 and result.report["layer_view"]["batches"] == 3
    reference = plain_session(mlp)
    for node, row in rows.items():
        others = tuple(n for n in rows if n != node)
        alone = reexported(mlp, batches, scales, others, tmp_path / "alone.onnx")
        want = output_error(reference, plain_session(alone), batches)
        got = row["output_error_quantized_alone"]
        assert got["rel_l2"] == pytest.approx(want["rel_l2"], rel=1e-4), node
        assert got["cosine"] == pytest.approx(want["cosine"], rel=1e-6), node
        assert 0 < got["rel_l2"] < result.report["layer_view"]["all_quantized"]["rel_l2"]
    found, _ = load_scales(scales)
    first = next(iter(rows.values()))
    ((tensor, sqnr),) = first["activation_sqnr_db"].items()
    float_model = onnx.load(str(mlp))
    float_model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, 1, None))
    session = ort.InferenceSession(
        float_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    scale = np.float32(found[tensor].scale)
    signal = noise = 0.0
    for batch in batches:
        x = session.run([tensor], batch)[0]
        xq = np.clip(np.rint(x / scale), -128, 127).astype(np.float32) * scale
        signal += float(np.sum(x.astype(np.float64) ** 2))
        noise += float(np.sum((x.astype(np.float64) - xq) ** 2))
    assert sqnr == pytest.approx(10 * math.log10(signal / noise), rel=1e-9)
    ((weight, weight_sqnr),) = first["weight_sqnr_db"].items()
    relative = next(
        r["weight_rel_error"] for r in result.report["tensors"] if r["tensor"] == weight
    )
    assert weight_sqnr == pytest.approx(-20 * math.log10(relative))


def test_target_leaves_the_fewest_nodes_float_and_holds_out_every_fifth_batch(mlp, tmp_path):
    batches = heavy_batches(10)
    held = [batches[4], batches[9]]
    view = calibrate_onnx(
        mlp, batches, format="int8", target="tensorrt", layer_view=True, validate_batches=0
    )
    worst = view.report["layer_view"]["all_quantized"]["cosine"]
    target = 1 - (1 - worst) / 3  # out of reach with every node quantized
    output, scales = tmp_path / "q.onnx", tmp_path / "q.safetensors"
    result = calibrate_onnx(
        mlp,
        batches,
        format="int8",
        target="tensorrt",
        target_cosine=target,
        output=output,
        scales=scales,
        validate_batches=0,
    )
    precision = result.report["precision"]
    floats = [f["node"] for f in precision["float_nodes"]]
    assert floats and precision["steps"][0]["cosine"] < target
    assert precision["heldout_switchable"]["cosine"] >= target
    exported = output_error(plain_session(mlp), plain_session(output), held)
    assert precision["heldout_exported"]["cosine"] == pytest.approx(exported["cosine"], rel=1e-6)
    assert set(result.report["excluded_nodes"]) >= set(floats)
    assert precision["quantized_matmul_gemm"] == {"quantized": 3 - len(floats), "of": 3}
    calibrated = [b for i, b in enumerate(batches) if i % 5 != 4]
    alone_scales = tmp_path / "split.safetensors"
    calibrate_onnx(
        mlp, calibrated, format="int8", target="tensorrt", scales=alone_scales, validate_batches=0
    )
    found, expected = load_scales(scales)[0], load_scales(alone_scales)[0]
    assert found and all(np.array_equal(found[t].amax, expected[t].amax) for t in found)
    for node in floats:
        rest = tuple(f for f in floats if f != node)
        trial = reexported(mlp, calibrated, alone_scales, rest, tmp_path / "trial.onnx")
        again = output_error(plain_session(mlp), plain_session(trial), held)
        assert again["cosine"] < target, node


def test_holdout_split_and_bad_targets(mlp):
    source = open_data([{"x": np.full((1, 5, 64), i, np.float32)} for i in range(7)])
    calibration, held = split_holdout(source, 3)
    assert [int(b["x"][0, 0, 0]) for b in held.batches()] == [2, 5]
    assert [int(b["x"][0, 0, 0]) for b in calibration.batches()] == [0, 1, 3, 4, 6]
    with pytest.raises(DataError, match="holdout_every"):
        split_holdout(source, 1)
    with pytest.raises(RecipeError, match="one output-error target"):
        calibrate_onnx(mlp, heavy_batches(5), target_cosine=0.9, target_rel_l2=0.1)
    with pytest.raises(RecipeError, match="out of range"):
        calibrate_onnx(mlp, heavy_batches(5), target_cosine=1.5)
    with pytest.raises(DataError, match=r"held out\).*holds no batch"):
        calibrate_onnx(mlp, heavy_batches(4), target_cosine=0.99, validate_batches=0)


def test_nvfp4_sensitivity_runs_on_the_emulation_and_is_that_of_the_fp4_graph(mlp, tmp_path):
    """NVFP4 (W4A4): the switchable form runs over the exact FP4 emulation in ORT; each node's
    sensitivity is the output error of the FP4 model quantizing only that node, run in the ONNX
    reference evaluator (float kernels sum in another order: a small tolerance)."""
    batches = heavy_batches(2)
    scales = tmp_path / "s.safetensors"
    result = calibrate_onnx(
        mlp,
        batches,
        format="nvfp4",
        layer_view=True,
        view_batches=2,
        scales=scales,
        validate_batches=0,
    )
    rows = {row["node"]: row for row in result.report["layers"]}
    assert len(rows) == 3
    reference = plain_session(mlp)
    for node, row in rows.items():
        others = tuple(n for n in rows if n != node)
        path = tmp_path / "alone.onnx"
        calibrate_onnx(
            mlp,
            batches,
            format="nvfp4",
            scales_in=scales,
            exclude=others,
            output=path,
            validate_batches=0,
        )
        evaluator = ReferenceEvaluator(str(path))
        error = ErrorTally(["y"])
        for batch in batches:
            error.add(reference.run(["y"], batch), evaluator.run(["y"], batch))
        got = row["output_error_quantized_alone"]
        assert got["rel_l2"] == pytest.approx(error.worst()["rel_l2"], rel=1e-3), node
        assert got["rel_l2"] > 1e-3  # FP4: every node's error is far from float

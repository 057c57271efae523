"""The AWQ step on a graph (awq_models.py): the folded float model gives the input model's
outputs in ONNX Runtime (within float rounding), the layers sharing the LayerNormalization's
output share one alpha, the factors fold into the LayerNormalization, a Mul and a producing
MatMul + bias; with clip the weights are clamped per block to the ratios chosen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from awq_models import OUTLIERS, block_batches, block_model
from onnx import numpy_helper

from qcal_export.analysis.awq import apply_awq, awq_groups, check_awq_scales
from qcal_export.analysis.planned import PlannedModel
from qcal_export.capture.data import open_data
from qcal_export.errors import DataError, RecipeError
from qcal_export.graphs.targets import find_targets
from qcal_export.spec.recipe_options import build_recipe


def planned(fmt: str = "int4", clip: int = 0, method: str = "awq") -> PlannedModel:
    options = {"clip": clip} if method == "awq" else {}
    recipe = build_recipe(
        None,
        format=fmt,
        activation_format="none",
        weight_method=method,
        block_size=16 if fmt == "int4" else None,
        method_options=options,
    )
    model = block_model()
    return PlannedModel(
        model, find_targets(model, recipe), recipe, Path("block.onnx"), ["CPUExecutionProvider"]
    )


def outputs(model: onnx.ModelProto, batches) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, b)[0] for b in batches])


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_folded_model_keeps_the_outputs(fmt):
    given = planned(fmt)
    scaled = apply_awq(given, open_data(block_batches(4)), None)
    batches = block_batches(3, seed=9)
    expected, found = outputs(given.model, batches), outputs(scaled.model, batches)
    np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert scaled.batches == 4
    assert set(scaled.section) == {"h", "a", "t"}
    assert scaled.section["h"]["consumers"] == ["q", "k", "v"]
    for entry in scaled.section.values():
        assert entry["relative_error"] <= entry["relative_error_rtn"]
    assert scaled.section["h"]["alpha"] > 0  # the outlier channels are worth protecting
    hows = " | ".join(scaled.notes)
    assert "folded into LayerNormalization ln" in hows
    assert "Mul" in hows and "folded into MatMul o and the bias of bias" in hows
    weights = scaled.plan.weights
    assert len(weights) == 5 and all("_smoothed" in w for w in weights)
    assert all(w.spec.method == "awq" for w in weights.values())


def test_factors_protect_the_outlier_channels():
    given = planned()
    scaled = apply_awq(given, open_data(block_batches(4)), None)
    gamma = numpy_helper.to_array(
        next(t for t in scaled.model.graph.initializer if t.name.startswith("gamma"))
    )
    factors = 25.0 / gamma[list(OUTLIERS)]  # the LayerNormalization took 1 / s
    others = 1.0 / np.delete(gamma, list(OUTLIERS))
    assert factors.min() > others.max()


def test_clip_clamps_blocks_to_the_ratios():
    plain = apply_awq(planned(), open_data(block_batches(4)), None)
    clipped = apply_awq(planned(clip=1), open_data(block_batches(4)), None)
    before = {t.name: numpy_helper.to_array(t) for t in plain.model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in clipped.model.graph.initializer}
    changed = [n for n in before if "_smoothed" in n and not np.array_equal(before[n], after[n])]
    assert changed
    for name in changed:
        assert np.abs(after[name]).max() <= np.abs(before[name]).max()
        assert np.all((after[name] == before[name]) | (np.abs(after[name]) < np.abs(before[name])))
    record = clipped.section["t"]["clip"]["wd"]
    assert record["clipped_blocks"] > 0
    assert record["relative_error_clipped"] < record["relative_error"]


def test_only_awq_weights_take_part_and_bad_input_is_refused():
    assert awq_groups(block_model(), planned(method="max").plan) == {}
    unchanged = apply_awq(planned(method="max"), open_data(block_batches(1)), None)
    assert "no awq weight" in unchanged.notes[0]
    with pytest.raises(DataError, match="awq searches its scales on data: pass --data"):
        apply_awq(planned(), None, None)
    with pytest.raises(RecipeError, match=r"awq .* scales_in \(--scales-in\)"):
        check_awq_scales(planned().plan, "scales.safetensors")
    check_awq_scales(planned(method="max").plan, "scales.safetensors")

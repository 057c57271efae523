"""``--data random``: batches shaped as the model's inputs (fixed dims, the batch size, or
--input-shape), the same on every pass, and a run on them marked as saying nothing of accuracy."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from data_forms import image_model, save, text_model
from onnx import TensorProto

from qcal_export.capture.data import model_inputs, open_data
from qcal_export.capture.random_data import NO_ACCURACY, RandomOptions, parse_input_shape
from qcal_export.errors import DataError, RecipeError
from qcal_export.pipeline.calibrate import calibrate_onnx


def source(model, options=None, batch_size=None):
    inputs = model_inputs(model)
    return open_data("random", batch_size=batch_size, options=options, inputs=lambda: inputs)


def test_batches_match_the_inputs_and_repeat_on_every_pass(caplog):
    with caplog.at_level(logging.WARNING):
        data = source(image_model([2, 3, 8, 8], TensorProto.FLOAT16), RandomOptions(batches=3))
    assert NO_ACCURACY in caplog.text
    assert data.synthetic
    first, second = list(data.batches()), list(data.batches())
    assert len(first) == 3
    for a, b in zip(first, second, strict=True):
        assert a["x"].shape == (2, 3, 8, 8) and a["x"].dtype == np.float16
        np.testing.assert_array_equal(a["x"], b["x"])
    want = np.random.default_rng([0, 1]).standard_normal((2, 3, 8, 8)).astype(np.float16)
    np.testing.assert_array_equal(first[1]["x"], want)


def test_symbolic_batch_takes_the_batch_size_and_other_dims_the_input_shapes():
    model = text_model(("input_ids", "attention_mask"), TensorProto.INT32)
    with pytest.raises(
        DataError, match=r"int32\[\?, \?\] has symbolic dims: pass --input-shape input_ids=4,N "
    ):
        source(model, batch_size=4)
    options = RandomOptions({"input_ids": (4, 16), "attention_mask": (4, 16)}, batches=2)
    (batch, _) = source(model, options).batches()
    assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(batch["attention_mask"], np.ones((4, 16), np.int32))
    (batch, *_) = source(image_model(["n", 3, 8, 8]), batch_size=5).batches()
    assert batch["x"].shape == (5, 3, 8, 8)


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"y": (1, 3, 8, 8)}, r"--input-shape names input\(s\) \['y'\]; the model has \['x'\]"),
        ({"x": (1, 4, 8, 8)}, r"--input-shape x=1,4,8,8 does not fit .* x float32\[\?, 3, 8, 8\]"),
    ],
)
def test_input_shapes_that_do_not_fit_are_named(shapes, message):
    with pytest.raises(DataError, match=message):
        source(image_model(["n", 3, 8, 8]), RandomOptions(shapes))


def test_input_shape_text_is_parsed_or_refused():
    assert parse_input_shape("input_ids=1,128") == ("input_ids", (1, 128))
    assert parse_input_shape("x=1x3x8x8") == ("x", (1, 3, 8, 8))
    for text in ("x", "x=", "=1,2", "x=a,b"):
        with pytest.raises(RecipeError, match=r"is not NAME=D0,D1"):
            parse_input_shape(text)
    with pytest.raises(RecipeError, match=r"dims must be integers >= 1"):
        RandomOptions({"x": (0, 3)})


def test_a_run_on_random_data_says_it_gives_no_accuracy(tmp_path):
    model = save(image_model(["n", 3, 8, 8]), tmp_path / "model.onnx")
    result = calibrate_onnx(
        model, "random", data_options=RandomOptions(batches=2), output=tmp_path / "q.onnx"
    )
    assert result.report["data"] == {
        "source": "2 random batches (x[1,3,8,8]) (calibration split)",
        "random": True,
    }
    assert NO_ACCURACY in result.report["plan_notes"]
    assert result.report["batches_per_pass"] == [2]

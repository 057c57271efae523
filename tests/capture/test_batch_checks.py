"""The per-batch check against the model's inputs (``as_feed`` / ``check_batch``): every
problem names the batch index and the input, with what the model expects."""

from __future__ import annotations

import numpy as np
import pytest
from data_models import ONE, TWO, batch, feeds
from onnx import TensorProto, helper

from qcal_export.capture.data import as_feed, check_batch, model_inputs, open_data
from qcal_export.errors import DataError


def bad_third_batch(**change) -> list[dict]:
    """Two good batches then one with ``change`` applied (None removes an input)."""
    third = batch(2, seed=3)
    for name, value in change.items():
        if value is None:
            del third[name]
        else:
            third[name] = value
    return [batch(2, seed=1), batch(2, seed=2), third]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"ids": None},
            r"^batch 2: missing input\(s\) \['ids'\] \(the model expects \['ids', 'x'\]",
        ),
        (
            {"mask": np.zeros((2, 4), np.int64)},
            r"^batch 2: unknown input\(s\) \['mask'\]",
        ),
        (
            {"x": np.zeros((2, 3), np.float64)},
            r"^batch 2, input 'x': dtype float64, the model expects float32$",
        ),
        (
            {"ids": np.zeros((2, 4), np.int32)},
            r"^batch 2, input 'ids': dtype int32, the model expects int64$",
        ),
        (
            {"x": np.zeros((2, 3, 1), np.float32)},
            r"^batch 2, input 'x': rank 3 \(shape \(2, 3, 1\)\), "
            r"the model expects x float32\[\?, 3\]$",
        ),
        (
            {"ids": np.zeros((2, 5), np.int64)},
            r"^batch 2, input 'ids': dim 1 is 5, the model expects ids int64\[\?, 4\]$",
        ),
    ],
    ids=["missing", "extra", "dtype", "int-dtype", "rank", "static-dim"],
)
def test_bad_batch_names_the_input_and_the_batch_index(change, message):
    source = open_data(bad_third_batch(**change))
    batches = source.batches()
    as_feed(next(batches), TWO, 0)
    as_feed(next(batches), TWO, 1)
    with pytest.raises(DataError, match=message):
        as_feed(next(batches), TWO, 2)


def test_missing_and_extra_inputs_are_reported_together():
    with pytest.raises(
        DataError, match=r"missing input\(s\) \['ids'\]; unknown input\(s\) \['y'\]"
    ):
        check_batch({"x": np.zeros((1, 3), np.float32), "y": np.zeros(1)}, TWO, 7)


def test_batch_that_is_not_a_dict_is_refused():
    with pytest.raises(DataError, match=r"^batch 4 is a list, not a dict"):
        check_batch([np.zeros((1, 3), np.float32)], ONE, 4)


def test_dynamic_dims_accept_varying_sizes_and_arrays_come_back_contiguous():
    sizes = [1, 5, 17, 2]
    items = [batch(n, seed=n) for n in sizes]
    items[1]["x"] = np.asfortranarray(items[1]["x"])  # non-contiguous input is accepted
    got = feeds(open_data(items), TWO)
    assert [b["x"].shape for b in got] == [(n, 3) for n in sizes]
    assert [b["ids"].shape for b in got] == [(n, 4) for n in sizes]
    assert all(b[k].flags.c_contiguous for b in got for k in b)
    assert np.array_equal(got[1]["x"], items[1]["x"])


def test_input_without_shape_accepts_any_rank():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "no_shape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    inputs = model_inputs(helper.make_model(graph))
    assert inputs[0].dims is None and inputs[0].describe() == "x float32[?]"
    for shape in [(3,), (2, 3, 4), (1, 1, 1, 1, 5)]:
        assert check_batch({"x": np.zeros(shape, np.float32)}, inputs, 0)["x"].shape == shape


def test_scalar_input_keeps_its_rank():
    """A rank-0 input (declared shape []) passes the check and must reach ORT as rank 0."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "gain"], ["y"])],
        "scalar_input",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("gain", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    inputs = model_inputs(helper.make_model(graph))
    assert inputs[1].dims == ()
    fed = check_batch({"x": np.ones((2, 3), np.float32), "gain": np.float32(2.5)}, inputs, 0)
    assert fed["gain"].shape == ()
    assert float(fed["gain"]) == 2.5

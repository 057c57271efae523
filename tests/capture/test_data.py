"""Calibration data readers and the per-batch check against the model's inputs.

Every source is read through ``open_data`` and checked with ``as_feed`` exactly as the capture
does; the models are small graphs built with onnx.helper, the data real files in tmp_path.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader

from qcal_export.capture.data import (
    as_feed,
    check_batch,
    model_inputs,
    open_data,
    select_batches,
    split_holdout,
)
from qcal_export.errors import DataError


def two_input_model() -> onnx.ModelProto:
    """Inputs x float32 [batch, 3] and ids int64 [batch, 4]; w is an initializer also listed
    as a graph input (old exporters do that) and must not be asked for."""
    w = numpy_helper.from_array(np.ones((3, 2), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], "mm"),
            helper.make_node("Identity", ["ids"], ["ids_out"], "id"),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["batch", 4]),
        ],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def one_input_model() -> onnx.ModelProto:
    """Input x float32 [batch, 3] with a symbolic batch."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], "relu")],
        "one_input",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


TWO = model_inputs(two_input_model())
ONE = model_inputs(one_input_model())


def batch(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, 3)).astype(np.float32),
        "ids": rng.integers(0, 100, size=(n, 4)).astype(np.int64),
    }


def feeds(source, inputs) -> list[dict[str, np.ndarray]]:
    """One pass over ``source``, each item checked as the capture checks it."""
    return [as_feed(item, inputs, i) for i, item in enumerate(source.batches())]


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert sorted(g) == sorted(w)
        for name in w:
            assert g[name].dtype == w[name].dtype
            assert np.array_equal(g[name], w[name])


# ---- model inputs ---------------------------------------------------------------------------


def test_model_inputs_skip_initializers_and_keep_symbolic_dims():
    assert [s.name for s in TWO] == ["x", "ids"]
    x, ids = TWO
    assert x.dtype == np.float32 and x.dims == (None, 3)
    assert ids.dtype == np.int64 and ids.dims == (None, 4)
    assert x.describe() == "x float32[?, 3]"


# ---- .npz file ------------------------------------------------------------------------------


def test_npz_file_is_one_batch(tmp_path):
    want = batch(10)
    np.savez(tmp_path / "calib.npz", **want)
    source = open_data(tmp_path / "calib.npz")
    assert_same_batches(feeds(source, TWO), [want])
    assert_same_batches(feeds(source, TWO), [want])  # a second pass reads the file again


def test_npz_file_split_by_batch_size(tmp_path):
    whole = batch(10)
    np.savez(tmp_path / "calib.npz", **whole)
    source = open_data(str(tmp_path / "calib.npz"), batch_size=4)
    got = feeds(source, TWO)
    assert [b["x"].shape[0] for b in got] == [4, 4, 2]
    assert [b["ids"].shape[0] for b in got] == [4, 4, 2]
    for name in whole:
        assert np.array_equal(np.concatenate([b[name] for b in got]), whole[name])
    assert len(feeds(source, TWO)) == 3


def test_npz_split_with_unequal_lengths_names_the_file(tmp_path):
    np.savez(tmp_path / "calib.npz", x=np.zeros((6, 3), np.float32), ids=np.zeros((5, 4), np.int64))
    source = open_data(tmp_path / "calib.npz", batch_size=2)
    with pytest.raises(DataError, match=r"calib\.npz.*differ in length"):
        feeds(source, TWO)


# ---- directories ----------------------------------------------------------------------------


def test_npz_directory_is_read_in_sorted_name_order(tmp_path):
    # created in an order that differs from the sorted one; sorted: a, b10, b2
    for marker, name in [(2.0, "b2"), (10.0, "b10"), (1.0, "a")]:
        data = batch(3, seed=int(marker))
        data["x"][:] = marker
        np.savez(tmp_path / f"{name}.npz", **data)
    (tmp_path / "README.txt").write_text("not a batch")
    source = open_data(tmp_path)
    got = feeds(source, TWO)
    assert [float(b["x"][0, 0]) for b in got] == [1.0, 10.0, 2.0]
    assert np.array_equal(got[1]["ids"], batch(3, seed=10)["ids"])
    assert "3 files" in source.description


def test_npz_directory_reads_lazily_and_names_a_corrupt_file(tmp_path):
    np.savez(tmp_path / "a.npz", **batch(2))
    (tmp_path / "b.npz").write_bytes(b"this is no zip archive")
    batches = open_data(tmp_path).batches()
    first = as_feed(next(batches), TWO, 0)  # the good file is served before the bad one is read
    assert first["x"].shape == (2, 3)
    with pytest.raises(DataError, match=r"cannot read data file .*b\.npz"):
        next(batches)


def test_selected_batches_of_a_directory_read_only_their_files(tmp_path):
    """A rank's shard of the calibration split: the held-out files and the other rank's are
    never opened (they are corrupt here), on every pass; a kept corrupt file is named."""
    for i in range(10):
        data = batch(1, seed=i)
        data["x"][:] = i
        np.savez(tmp_path / f"{i:02d}.npz", **data)
    for i in (4, 9, 0, 2, 5, 7):  # held out (every 5th), then rank 0's shard of the rest
        (tmp_path / f"{i:02d}.npz").write_bytes(b"this is no zip archive")
    calibration, held = split_holdout(open_data(tmp_path), 5)
    rank = select_batches(calibration, lambda i: i % 2 == 1, "rank 1 of 2")
    for _ in range(2):
        assert [int(b["x"][0, 0]) for b in rank.batches()] == [1, 3, 6, 8]
    assert [index for index, _ in rank.pairs()] == [1, 3, 6, 8]  # errors name these
    assert rank.description.endswith("(calibration split) (rank 1 of 2)")
    other = select_batches(calibration, lambda i: i % 2 == 0, "rank 0 of 2")
    with pytest.raises(DataError, match=r"cannot read data file .*00\.npz"):
        list(other.batches())
    with pytest.raises(DataError, match=r"cannot read data file .*04\.npz"):
        list(held.batches())


def test_selected_batches_of_an_iterable_keep_their_order():
    source = open_data([{"x": np.full((1, 3), i, np.float32)} for i in range(7)])
    calibration, _ = split_holdout(source, 3)
    rank = select_batches(calibration, lambda i: i % 2 == 0, "rank 0 of 2")
    assert [int(b["x"][0, 0]) for b in rank.batches()] == [0, 3, 6]


def test_npy_directory_feeds_a_single_input_model(tmp_path):
    arrays = [np.full((n, 3), n, np.float32) for n in (1, 4, 2)]
    for i, a in enumerate(arrays):
        np.save(tmp_path / f"batch_{i:03d}.npy", a)
    got = feeds(open_data(tmp_path), ONE)
    assert_same_batches(got, [{"x": a} for a in arrays])


def test_npy_directory_for_a_multi_input_model_names_the_inputs(tmp_path):
    np.save(tmp_path / "batch_000.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(DataError, match=r"batch 0 is a bare array.*\['x', 'ids'\]"):
        feeds(open_data(tmp_path), TWO)


def test_directory_problems_raise_data_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty holds no \.npz or \.npy"):
        open_data(empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", np.zeros((1, 3), np.float32))
    np.savez(mixed / "b.npz", x=np.zeros((1, 3), np.float32))
    with pytest.raises(DataError, match=r"mixed mixes \.npz and \.npy"):
        open_data(mixed)
    with pytest.raises(DataError, match=r"data path .*missing does not exist"):
        open_data(tmp_path / "missing")
    np.save(tmp_path / "single.npy", np.zeros((1, 3), np.float32))
    with pytest.raises(DataError, match=r"single\.npy is not a \.npz file"):
        open_data(tmp_path / "single.npy")


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "calib.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match=r"cannot read data file .*calib\.npz"):
        feeds(open_data(tmp_path / "calib.npz"), ONE)


# ---- Python sources -------------------------------------------------------------------------


def test_list_of_dicts_is_re_iterable():
    want = [batch(2, seed=1), batch(5, seed=2)]
    source = open_data(want)
    assert_same_batches(feeds(source, TWO), want)
    assert_same_batches(feeds(source, TWO), want)


def test_single_dict_is_one_batch():
    want = batch(3)
    assert_same_batches(feeds(open_data(want), TWO), [want])


def test_callable_returning_an_iterator_is_called_once_per_pass():
    want = [batch(2, seed=s) for s in range(3)]
    calls = []

    def make():
        calls.append(1)
        return (dict(b) for b in want)

    source = open_data(make)
    assert calls == []  # nothing is read until a pass starts
    assert_same_batches(feeds(source, TWO), want)
    assert_same_batches(feeds(source, TWO), want)
    assert len(calls) == 2
    assert "make" in source.description


def test_one_shot_generator_serves_one_pass_then_raises():
    want = [batch(2, seed=s) for s in range(3)]
    source = open_data(dict(b) for b in want)
    assert_same_batches(feeds(source, TWO), want)
    with pytest.raises(DataError, match="one-shot iterator"):
        source.batches()


def test_unsupported_source_raises_data_error():
    with pytest.raises(DataError, match="cannot read calibration data from a int"):
        open_data(42)


class RewindingReader(CalibrationDataReader):
    def __init__(self, batches: list[dict]):
        self.batches = batches
        self.position = 0
        self.rewinds = 0

    def get_next(self) -> dict | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return self.batches[self.position - 1]

    def rewind(self) -> None:
        self.rewinds += 1
        self.position = 0


class ForwardOnlyReader(CalibrationDataReader):
    def __init__(self, batches: list[dict]):
        self._it = iter(batches)

    def get_next(self) -> dict | None:
        return next(self._it, None)


def test_calibration_data_reader_with_rewind_serves_every_pass():
    want = [batch(2, seed=s) for s in range(3)]
    reader = RewindingReader(want)
    source = open_data(reader)
    assert_same_batches(feeds(source, TWO), want)
    assert reader.rewinds == 0  # the first pass starts where the reader stands
    assert_same_batches(feeds(source, TWO), want)
    assert_same_batches(feeds(source, TWO), want)
    assert reader.rewinds == 2


def test_calibration_data_reader_without_rewind_fails_on_the_second_pass():
    want = [batch(2, seed=s) for s in range(2)]
    source = open_data(ForwardOnlyReader(want))
    assert_same_batches(feeds(source, TWO), want)
    with pytest.raises(DataError, match=r"ForwardOnlyReader has no rewind\(\)"):
        source.batches()


# ---- batch checks ---------------------------------------------------------------------------


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

"""Calibration data readers: every source is read through ``open_data`` and checked with
``as_feed`` exactly as the capture does (the per-batch check itself: test_batch_checks.py).

The models are small graphs built with onnx.helper (data_models.py), the data real files in
tmp_path.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from data_models import ONE, TWO, batch, feeds
from onnxruntime.quantization import CalibrationDataReader

from qcal_export.capture.data import (
    as_feed,
    open_data,
    select_batches,
    split_holdout,
)
from qcal_export.errors import DataError, RecipeError


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
    (empty / "notes.md").write_text("x")
    with pytest.raises(DataError, match=r"empty holds no \.npz/\.npy batches, \.png/\.jpg/"):
        open_data(empty)
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty holds texts: pass --tokenizer DIR"):
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


def damaged(path, damage: str) -> None:
    """Damage a saved batch file in place."""
    data = bytearray(path.read_bytes())
    if damage == "truncated":  # the last 8 bytes lost: the .npy's data, the zip's directory
        data = data[:-8]
    elif damage == "empty":
        data = bytearray()
    elif damage == "array-byte":  # inside the stored array: the zip CRC no longer holds
        data[len(data) // 2] ^= 0x01
    elif damage == "header":  # the .npy header's dict no longer parses
        data = data.replace(b"'shape': (2, 3)", b"'shape': (2, 3")
    elif damage == "huge":  # a header asking for 2**46 floats, of a file of 24 bytes
        header = io.BytesIO()
        fields = {"descr": "<f4", "fortran_order": False, "shape": (2**46,)}
        np.lib.format.write_array_header_1_0(header, fields)
        data = bytearray(header.getvalue()) + data[-24:]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("a.npz", "truncated", r"BadZipFile: File is not a zip file$"),
        ("a.npz", "empty", r"EOFError: No data left in file$"),
        ("a.npz", "array-byte", r"BadZipFile: Bad CRC-32 for file 'x\.npy'$"),
        ("c.npz", "array-byte", r"BadZipFile: Bad CRC-32 for file 'x\.npy'$|error: Error -3"),
        (
            "a.npy",
            "truncated",
            r"ValueError: Failed to read all data for array\. Expected \(2, 3\)",
        ),
        ("a.npy", "empty", r"EOFError: No data left in file$"),
        ("a.npy", "header", r"ValueError: Cannot parse header|TokenError"),
        ("a.npy", "huge", r"ValueError: Failed to read all data|asks for more memory"),
    ],
)
def test_damaged_batch_files_raise_data_error_naming_them(tmp_path, name, damage, message):
    """The errors zipfile, zlib and numpy raise (BadZipFile, EOFError, zlib.error, ...), also
    those of a .npz's lazily read arrays, are DataErrors naming the file."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = tmp_path / name
    if name.endswith(".npz"):
        (np.savez_compressed if name == "c.npz" else np.savez)(path, x=x)
    else:
        np.save(path, x)
    damaged(path, damage)
    with pytest.raises(DataError, match=rf"cannot read data file .*{name[0]}\.np.: " + message):
        feeds(open_data(tmp_path), ONE)


def test_file_content_must_match_its_suffix(tmp_path):
    x = np.zeros((2, 3), np.float32)
    (tmp_path / "npz").mkdir()
    np.save(tmp_path / "npz" / "a.npy", x)
    (tmp_path / "npz" / "a.npy").rename(tmp_path / "npz" / "a.npz")
    with pytest.raises(DataError, match=r"a\.npz holds a \.npy array, not a \.npz archive"):
        feeds(open_data(tmp_path / "npz"), ONE)
    (tmp_path / "npy").mkdir()
    np.savez(tmp_path / "npy" / "a.npz", x=x)
    (tmp_path / "npy" / "a.npz").rename(tmp_path / "npy" / "a.npy")
    with pytest.raises(DataError, match=r"a\.npy holds a \.npz archive, not a \.npy array"):
        feeds(open_data(tmp_path / "npy"), ONE)


def test_pipes_and_directories_among_batch_files_are_skipped(tmp_path, caplog):
    """A named pipe would block the read forever; it is never opened, nor is a directory."""
    np.save(tmp_path / "b.npy", np.ones((2, 3), np.float32))
    os.mkfifo(tmp_path / "a.npy")
    (tmp_path / "c.npy").mkdir()
    source = open_data(tmp_path)
    assert source.description.startswith("1 files in")
    assert "skipped ['a.npy', 'c.npy'] (not regular files)" in caplog.text
    assert_same_batches(feeds(source, ONE), [{"x": np.ones((2, 3), np.float32)}])
    with pytest.raises(DataError, match=r"data path .*a\.npy is neither a regular file nor a"):
        open_data(tmp_path / "a.npy")


@pytest.mark.parametrize("batch_size", [0, -2, 2.5, True, "4"])
def test_batch_size_must_be_a_positive_integer(tmp_path, batch_size):
    with pytest.raises(
        RecipeError,
        match=rf"batch_size \(--batch-size\) must be an integer >= 1, not {batch_size!r}",
    ):
        open_data(tmp_path, batch_size=batch_size)


def test_scalar_arrays_cannot_be_split_into_batches(tmp_path):
    np.savez(tmp_path / "calib.npz", x=np.zeros((4, 3), np.float32), step=np.float32(1))
    with pytest.raises(DataError, match=r"calib\.npz: arrays \['step'\] are scalars"):
        list(open_data(tmp_path / "calib.npz", batch_size=2).batches())


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

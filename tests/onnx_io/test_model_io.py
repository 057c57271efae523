"""Reading ONNX models (external data included) and writing them atomically, on real files."""

from __future__ import annotations

import hashlib
import os
import re
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from full_disk import run_with_file_limit
from onnx import TensorProto, helper, numpy_helper

from qcal_export.capture.onnxruntime import stored_session
from qcal_export.errors import ModelError, OutputError
from qcal_export.onnx_io.model_io import load_model, save_model
from qcal_export.onnx_io.weights import is_stored, to_array

FLOAT = TensorProto.FLOAT


def make_model(k: int = 64, n: int = 32, seed: int = 0) -> onnx.ModelProto:
    """x [b, k] @ w [k, n] + bias [n]: w is 8 KiB at the defaults, bias 128 bytes."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], "mm"),
            helper.make_node("Add", ["h", "bias"], ["y"], "add"),
        ],
        "g",
        [helper.make_tensor_value_info("x", FLOAT, ["b", k])],
        [helper.make_tensor_value_info("y", FLOAT, ["b", n])],
        initializer=[
            numpy_helper.from_array(rng.normal(0, 1, (k, n)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.normal(0, 1, (n,)).astype(np.float32), "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: to_array(t) for t in model.graph.initializer}


def assert_same_weights(got: onnx.ModelProto, want: onnx.ModelProto) -> None:
    got_w, want_w = weights(got), weights(want)
    assert sorted(got_w) == sorted(want_w)
    for name, values in want_w.items():
        assert got_w[name].dtype == values.dtype
        assert np.array_equal(got_w[name], values), name
    for t in got.graph.initializer:  # in the proto, or in its weight store
        assert is_stored(t) or (t.data_location == TensorProto.DEFAULT and not t.external_data)


def run(model_or_path, x: np.ndarray) -> np.ndarray:
    if isinstance(model_or_path, onnx.ModelProto):
        session = stored_session(model_or_path, ort.SessionOptions(), ["CPUExecutionProvider"])
    else:
        session = ort.InferenceSession(str(model_or_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# load_model -------------------------------------------------------------------------------------


def test_load_model_reads_an_inline_model(tmp_path):
    model = make_model()
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    loaded = load_model(path)
    assert loaded.path == path
    assert loaded.external_data is False
    assert loaded.opset == 17
    assert loaded.sha256 == sha256(path)
    assert_same_weights(loaded.proto, model)
    assert [n.op_type for n in loaded.proto.graph.node] == ["MatMul", "Add"]


def test_load_model_reads_external_data(tmp_path):
    model = make_model()
    path = tmp_path / "ext.onnx"
    onnx.save_model(  # onnx moves the tensors of the model it saves out: give it a copy
        make_model(),
        str(path),
        save_as_external_data=True,
        size_threshold=0,
        location="ext.weights",
    )
    assert (tmp_path / "ext.weights").stat().st_size >= (64 * 32 + 32) * 4
    assert path.stat().st_size < 1000  # the weights are not inline
    loaded = load_model(str(path))
    assert loaded.external_data is True
    assert loaded.sha256 == sha256(path)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_same_weights(loaded.proto, model)
    x = np.random.default_rng(1).normal(0, 1, (3, 64)).astype(np.float32)
    np.testing.assert_array_equal(run(loaded.proto, x), run(model, x))


def test_load_model_raises_naming_the_path(tmp_path):
    missing = tmp_path / "missing.onnx"
    with pytest.raises(ModelError) as e:
        load_model(missing)
    assert str(missing) in str(e.value)

    text = tmp_path / "notes.onnx"
    text.write_text("this is not an ONNX model, just some text\n" * 20)
    with pytest.raises(ModelError) as e:
        load_model(text)
    assert str(text) in str(e.value)

    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelError) as e:
        load_model(empty)
    assert str(empty) in str(e.value)

    data = make_model().SerializeToString()
    for cut in (len(data) // 2, len(data) - 20, 7):
        truncated = tmp_path / f"truncated_{cut}.onnx"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ModelError) as e:
            load_model(truncated)
        assert str(truncated) in str(e.value)

    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    with pytest.raises(ModelError) as e:
        load_model(folder)
    assert str(folder) in str(e.value)


def test_load_model_with_missing_external_data_raises_naming_the_path(tmp_path):
    """Exposes a bug: model_io.py load_model catches (OSError, ValueError) around
    ``onnx.load_external_data_for_model``, but onnx 1.23 reports a missing data file as
    ``onnx.checker.ValidationError`` (an Exception, neither of those): it escapes unwrapped."""
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        make_model(), str(path), save_as_external_data=True, size_threshold=0, location="w.bin"
    )
    (tmp_path / "w.bin").unlink()
    with pytest.raises(ModelError) as e:
        load_model(path)
    assert str(path) in str(e.value)


# save_model -------------------------------------------------------------------------------------


def test_save_model_inline_writes_one_complete_file(tmp_path):
    model = make_model()
    path = tmp_path / "out.onnx"
    assert save_model(model, path, external_data=False) == path
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]  # no temporary left behind
    assert path.read_bytes() == model.SerializeToString()
    loaded = load_model(path)
    assert loaded.external_data is False
    assert_same_weights(loaded.proto, model)


def data_files(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".data"))


def locations(path) -> set[str]:
    raw = onnx.load(str(path), load_external_data=False)
    return {
        {e.key: e.value for e in t.external_data}["location"]
        for t in raw.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
    }


def test_save_model_with_external_data_writes_a_data_file_of_its_own(tmp_path):
    path = tmp_path / "out.onnx"
    save_model(make_model(), path, external_data=True)
    [data] = data_files(tmp_path)
    assert re.fullmatch(r"out\.onnx\.[0-9a-f]{12}\.data", data)
    assert sorted(os.listdir(tmp_path)) == sorted(["out.onnx", data])  # no temporary left
    assert (tmp_path / data).stat().st_size >= 64 * 32 * 4
    assert path.stat().st_size < 64 * 32 * 4  # w went to the data file
    assert locations(path) == {data}  # relative, beside the model
    data_mode = (tmp_path / data).stat().st_mode & 0o777
    assert data_mode == path.stat().st_mode & 0o777  # readable as the model is, not 0600
    loaded = load_model(path)
    assert loaded.external_data is True
    assert_same_weights(loaded.proto, make_model())
    x = np.random.default_rng(2).normal(0, 1, (2, 64)).astype(np.float32)
    np.testing.assert_array_equal(run(path, x), run(make_model(), x))


def test_save_model_leaves_the_callers_model_unchanged(tmp_path):
    """Exposes a bug: model_io.py save_model hands the caller's proto to ``onnx.save_model``
    with ``save_as_external_data=True``, which converts it in place: afterwards the caller's
    initializers are marked EXTERNAL (location ``out.onnx.data``, relative) and their raw data
    is cleared, so the in-memory model (ExportResult.model in the pipeline) has lost its weights.
    """
    model = make_model()
    before = model.SerializeToString()
    save_model(model, tmp_path / "out.onnx", external_data=True)
    assert all(t.data_location == TensorProto.DEFAULT for t in model.graph.initializer)
    assert model.SerializeToString() == before


def test_save_model_with_external_data_and_only_small_tensors(tmp_path):
    """Every tensor under 1 KiB stays inline: no data file, nothing left behind."""
    path = tmp_path / "small.onnx"
    save_model(make_model(k=4, n=3), path, external_data=True)
    assert os.listdir(tmp_path) == ["small.onnx"]
    assert_same_weights(load_model(path).proto, make_model(k=4, n=3))


def test_save_model_replaces_an_existing_model_and_removes_its_old_data(tmp_path):
    path = tmp_path / "out.onnx"
    save_model(make_model(seed=1), path, external_data=True)
    [first] = data_files(tmp_path)
    save_model(make_model(seed=2), path, external_data=True)
    [second] = data_files(tmp_path)
    assert second != first and locations(path) == {second}
    assert sorted(os.listdir(tmp_path)) == sorted(["out.onnx", second])
    assert_same_weights(load_model(path).proto, make_model(seed=2))
    save_model(make_model(seed=1), path, external_data=False)
    assert os.listdir(tmp_path) == ["out.onnx"]
    assert_same_weights(load_model(path).proto, make_model(seed=1))


def test_save_model_removes_only_the_old_models_own_data_files(tmp_path):
    """The old output's ``out.onnx.data`` (as earlier releases named it) goes; a data file it
    references under another name, a file in ``keep`` and unreferenced look-alikes stay."""
    path = tmp_path / "out.onnx"
    onnx.save_model(
        make_model(seed=1), str(path), save_as_external_data=True, location="out.onnx.data"
    )
    save_model(make_model(seed=2), path, external_data=True)
    [written] = data_files(tmp_path)
    assert written != "out.onnx.data"
    (tmp_path / written).unlink()  # the next old model is onnx's

    onnx.save_model(make_model(seed=1), str(path), save_as_external_data=True, location="w.bin")
    stray = tmp_path / "out.onnx.0123456789ab.data"
    stray.write_bytes(b"not referenced")
    save_model(make_model(seed=2), path, external_data=False)
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", stray.name, "w.bin"]

    onnx.save_model(
        make_model(seed=1), str(path), save_as_external_data=True, location="out.onnx.data"
    )
    before = sha256(tmp_path / "out.onnx.data")
    save_model(make_model(seed=2), path, external_data=False, keep=[tmp_path / "out.onnx.data"])
    assert sha256(tmp_path / "out.onnx.data") == before
    assert_same_weights(load_model(path).proto, make_model(seed=2))


def test_save_model_leaves_a_folder_with_the_old_data_name_alone(tmp_path):
    (tmp_path / "out.onnx.data").mkdir()
    (tmp_path / "out.onnx.data" / "keep").write_text("x")
    path = tmp_path / "out.onnx"
    save_model(make_model(), path, external_data=True)
    assert os.listdir(tmp_path / "out.onnx.data") == ["keep"]
    assert_same_weights(load_model(path).proto, make_model())


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE")
@pytest.mark.parametrize("external_data", [True, False], ids=["external-data", "inline"])
def test_save_model_on_a_full_disk_names_the_file_and_keeps_the_old_model(tmp_path, external_data):
    """Writing a 512 KiB weight where files stop at 64 KiB: one OutputError naming the model,
    the old model and its data as they were, no temporary file or folder left."""
    path = tmp_path / "out.onnx"
    save_model(make_model(seed=1), path, external_data=True)
    before = {p.name: sha256(p) for p in tmp_path.iterdir()}
    source = tmp_path.parent / f"{tmp_path.name}-big.onnx"
    onnx.save_model(make_model(k=512, n=256, seed=2), str(source))
    code = f"""
        import onnx
        from qcal_export.errors import OutputError
        from qcal_export.onnx_io.model_io import save_model
        try:
            save_model(onnx.load({str(source)!r}), {str(path)!r}, external_data={external_data})
        except OutputError as e:
            print(e)
    """
    child = run_with_file_limit(code, 64 << 10)
    assert child.returncode == 0, child.stderr
    assert child.stdout == f"cannot write {path}: File too large\n"
    assert {p.name: sha256(p) for p in tmp_path.iterdir()} == before
    assert_same_weights(load_model(path).proto, make_model(seed=1))


def test_save_model_into_a_missing_directory_raises_naming_it(tmp_path):
    path = tmp_path / "no" / "such" / "dir" / "out.onnx"
    with pytest.raises(OutputError) as e:
        save_model(make_model(), path, external_data=False)
    assert str(path) in str(e.value)
    assert not (tmp_path / "no").exists()

    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    with pytest.raises(OutputError) as e:
        save_model(make_model(), folder, external_data=False)
    assert str(folder) in str(e.value)
    assert os.listdir(folder) == []

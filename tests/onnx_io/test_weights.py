"""The weight store: large initializers out of the proto, read from their file when asked,
handed to ONNX Runtime as external initializers, and written back tensor by tensor."""

from __future__ import annotations

import hashlib

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcal_export import calibrate_onnx
from qcal_export.calibrate.tensor import calibrate_weights
from qcal_export.capture.onnxruntime import open_session
from qcal_export.errors import ModelError
from qcal_export.graphs.export import export_qdq
from qcal_export.onnx_io.model_io import check_model, load_model, save_model
from qcal_export.onnx_io.weight_views import materialized
from qcal_export.onnx_io.weights import (
    SPILL_BYTES,
    WeightStore,
    derived_tensor,
    is_stored,
    to_array,
)
from qcal_export.pipeline.run import plan_run
from qcal_export.spec.config import CalibrationConfig

CPU = ["CPUExecutionProvider"]
DTYPES = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.BFLOAT16: ml_dtypes.bfloat16,
}


def chain(elem_type: int = TensorProto.FLOAT, k: int = 32, layers: int = 3) -> onnx.ModelProto:
    """x -> (Cast to the weights' type) -> MatMul w_i -> ... -> Cast to float: weights of
    ``k x k`` in ``elem_type`` (4 KiB each in float32, over MIN_BYTES), a small shape constant
    and a bias under it (they stay in the proto)."""
    rng = np.random.default_rng(0)
    dtype = DTYPES[elem_type]
    nodes = [helper.make_node("Cast", ["x"], ["h0"], "cast_in", to=elem_type)]
    inits = []
    for i in range(layers):
        w = (rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32).astype(dtype)
        inits.append(_tensor(w, elem_type, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"], f"mm{i}"))
    inits.append(_tensor(np.linspace(-1, 1, 8).astype(np.float32).astype(dtype), elem_type, "b"))
    inits.append(numpy_helper.from_array(np.array([-1, k], np.int64), "shape"))
    nodes += [
        helper.make_node("Reshape", [f"h{layers}", "shape"], ["r"], "reshape"),
        helper.make_node("Cast", ["r"], ["y"], "cast_out", to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", k])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


def _tensor(array: np.ndarray, elem_type: int, name: str) -> TensorProto:
    if elem_type == TensorProto.BFLOAT16:
        raw = array.view(np.uint16).tobytes()
        return helper.make_tensor(name, elem_type, array.shape, raw, raw=True)
    return numpy_helper.from_array(array, name)


def save(model: onnx.ModelProto, path, external: bool, threshold: int = 1024):
    """``model`` at ``path``, its tensors of ``threshold`` bytes or more in ``<name>.bin``
    with ``external`` (ONNX Runtime itself cannot read a Reshape's shape from there)."""
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            location=f"{path.name}.bin",
            size_threshold=threshold,
        )
    else:
        onnx.save_model(model, str(path))
    return path


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def feed(k: int = 32) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)}


@pytest.mark.parametrize("external", [True, False], ids=["external", "embedded"])
@pytest.mark.parametrize("elem_type", list(DTYPES), ids=["float32", "float16", "bfloat16"])
def test_the_store_reads_what_onnx_reads_element_for_element(tmp_path, external, elem_type):
    """Every tensor in the data file (threshold 0): the small ones are read into the proto."""
    path = save(chain(elem_type), tmp_path / "m.onnx", external, threshold=0)
    want = onnx.load(str(path))
    loaded = load_model(path)
    stored = {t.name for t in loaded.proto.graph.initializer if is_stored(t)}
    assert stored == {"w0", "w1", "w2"}  # the bias and the shape stay in the proto
    for init in want.graph.initializer:
        got = to_array(next(t for t in loaded.proto.graph.initializer if t.name == init.name))
        expected = numpy_helper.to_array(init)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert got.view(np.uint8).tobytes() == expected.view(np.uint8).tobytes(), init.name
    weights = sum(to_array(t).nbytes for t in loaded.proto.graph.initializer if is_stored(t))
    assert loaded.proto.ByteSize() < weights / 4
    loaded.store.release()


@pytest.mark.parametrize("external", [True, False], ids=["external", "embedded"])
@pytest.mark.parametrize("elem_type", list(DTYPES)[:2], ids=["float32", "float16"])
def test_a_session_over_the_light_proto_gives_the_outputs_of_the_file(
    tmp_path, external, elem_type
):
    """(ORT's CPU provider has no bfloat16 MatMul: bfloat16 is the next test's.)"""
    path = save(chain(elem_type), tmp_path / "m.onnx", external)
    loaded = load_model(path)
    want = ort.InferenceSession(str(path), providers=CPU).run(None, feed())[0]
    got = open_session(loaded.proto, CPU, "light").run(None, feed())[0]
    np.testing.assert_array_equal(got, want)
    loaded.store.release()


def test_a_bfloat16_weight_reaches_ort_as_its_bits(tmp_path):
    """A bfloat16 initializer read through a Cast (ORT's CPU provider casts bfloat16) is the
    same as onnx's load of the file."""
    w = np.random.default_rng(0).standard_normal((16, 32)).astype(ml_dtypes.bfloat16)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["w"], ["y"], "cast", to=TensorProto.FLOAT)],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 32])],
        [_tensor(w, TensorProto.BFLOAT16, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    path = save(model, tmp_path / "bf.onnx", external=True)
    loaded = load_model(path)
    got = open_session(loaded.proto, CPU, "bf16").run(None, {})[0]
    np.testing.assert_array_equal(got, w.astype(np.float32))
    loaded.store.release()


@pytest.mark.parametrize("external", [True, False], ids=["external", "embedded"])
def test_save_model_writes_a_light_model_tensor_by_tensor(tmp_path, external):
    source = save(chain(), tmp_path / "m.onnx", external=True)
    loaded = load_model(source)
    (tmp_path / "out").mkdir()
    out = save_model(loaded.proto, tmp_path / "out" / "q.onnx", external_data=external)
    onnx.checker.check_model(str(out), full_check=True)
    written = onnx.load(str(out), load_external_data=False)
    moved = {t.name for t in written.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert moved == ({"w0", "w1", "w2"} if external else set())
    for t in written.graph.initializer:
        offset = {e.key: e.value for e in t.external_data}.get("offset")
        assert offset is None or int(offset) % 64 == 0
    want = ort.InferenceSession(str(source), providers=CPU).run(None, feed())[0]
    got = ort.InferenceSession(str(out), providers=CPU).run(None, feed())[0]
    np.testing.assert_array_equal(got, want)
    assert [p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".tmp"] == []
    loaded.store.release()


def test_a_missing_or_short_data_file_is_found_on_load(tmp_path):
    path = save(chain(), tmp_path / "m.onnx", external=True)
    data = tmp_path / "m.onnx.bin"
    data.write_bytes(data.read_bytes()[:100])  # w0 (4 KiB) is first
    with pytest.raises(ModelError, match=r"m\.onnx: cannot read its external data .*'w0'"):
        load_model(path)


def test_the_checker_sees_the_light_proto_as_onnx_sees_the_file(tmp_path):
    """A stored initializer is checked as an input of its type and shape: a node reading a
    tensor that no one produces is still found."""
    path = save(chain(), tmp_path / "m.onnx", external=True)
    loaded = load_model(path)
    check_model(loaded.proto, "light", full=True)
    loaded.proto.graph.node[1].input[0] = "nowhere"
    with pytest.raises(ModelError, match=r"light fails onnx's checker: .*nowhere"):
        check_model(loaded.proto, "light", full=True)
    assert materialized(loaded.proto).ByteSize() > 3 * 32 * 32 * 4
    loaded.store.release()


def test_a_model_with_external_data_is_calibrated_without_its_weights_in_the_proto(tmp_path):
    """The planned model and its QDQ export keep their weights in the store (the protos stay
    a fraction of the weights' bytes); the run writes nothing beside the input; the QDQ model
    written runs close to the float one."""
    folder = tmp_path / "in"
    folder.mkdir()
    k = 64
    path = save(chain(k=k, layers=4), folder / "m.onnx", external=True)
    before = digest(folder)
    batches = [feed(k) for _ in range(2)]
    recipe = CalibrationConfig.from_options(activation_format="none").quantization.build()
    run = plan_run(path, recipe, batches, None, "cpu")
    weight_bytes = 4 * k * k * 4
    assert run.loaded.proto.ByteSize() < weight_bytes / 10
    found = calibrate_weights(run.loaded.proto, run.plan, "error")
    exported = export_qdq(run.loaded.proto, run.plan, found, "quantized")
    quantized = [t for t in exported.model.graph.initializer if t.name.endswith("_quantized")]
    assert len(quantized) == 4
    assert all(is_stored(t) and t.data_type == TensorProto.INT8 for t in quantized)
    assert exported.model.ByteSize() < weight_bytes / 10
    run.loaded.store.release()

    (tmp_path / "out").mkdir()
    result = calibrate_onnx(path, batches, output=tmp_path / "out" / "q.onnx", format="int8")
    assert digest(folder) == before
    want = ort.InferenceSession(str(path), providers=CPU).run(None, batches[0])[0]
    got = ort.InferenceSession(str(result.model_path), providers=CPU).run(None, batches[0])[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05


def test_large_arrays_given_to_the_store_are_read_back_from_its_file():
    """An array of SPILL_BYTES or more is kept in the store's temporary file, mapped read-only;
    its pages can be dropped and read again, the same values."""
    store = WeightStore()
    big = np.random.default_rng(0).standard_normal((SPILL_BYTES // 4 + 16,)).astype(np.float32)
    small = np.arange(10, dtype=np.int64)
    store.put("big", big)
    store.put("small", small)
    got = store.get("big")
    assert not got.flags.writeable and np.array_equal(got, big)
    store.drop_pages()
    np.testing.assert_array_equal(store.get("big"), big)
    np.testing.assert_array_equal(store.get("small"), small)
    store.release()
    assert "big" not in store


def test_a_file_opened_by_path_reads_its_store_only_while_the_file_is_unchanged(tmp_path):
    """open_session(path) over a model loaded into a store shares the store's weights; once
    the file is rewritten (other weights), the session reads the new file."""
    path = save(chain(), tmp_path / "m.onnx", external=True)
    loaded = load_model(path)
    shared = open_session(path, CPU, "shared").run(None, feed())[0]
    np.testing.assert_array_equal(
        shared, ort.InferenceSession(str(path), providers=CPU).run(None, feed())[0]
    )
    other = chain()
    for init in other.graph.initializer:
        if init.name.startswith("w"):
            init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    save(other, path, external=True)
    got = open_session(path, CPU, "rewritten").run(None, feed())[0]
    np.testing.assert_array_equal(got, -shared)  # three layers: the sign flips
    loaded.store.release()


def test_an_embedded_weight_whose_data_does_not_fit_its_dims_is_named(tmp_path):
    model = chain()
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    path = tmp_path / "short.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(ModelError, match=r"short\.onnx: initializer 'w0' cannot be read"):
        load_model(path)


@pytest.mark.parametrize("external", [True, False], ids=["external", "embedded"])
def test_a_derived_fp8_weight_is_written_as_its_bits(tmp_path, external):
    """A quantized weight the store holds in ml_dtypes' float8 (no buffer protocol) is written
    byte for byte: ORT's DequantizeLinear of the written model gives codes x scale."""
    path = save(chain(), tmp_path / "m.onnx", external=True)
    loaded = load_model(path)
    source = next(t for t in loaded.proto.graph.initializer if t.name == "w0")
    codes = (to_array(source) / 0.05).astype(ml_dtypes.float8_e4m3fn)

    def make() -> TensorProto:
        raw = codes.view(np.uint8).tobytes()
        return helper.make_tensor("wq", TensorProto.FLOAT8E4M3FN, codes.shape, raw, raw=True)

    stored = derived_tensor("wq", source, "fp8", make)
    assert is_stored(stored)
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["wq", "s"], ["y"], "dq")],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(codes.shape))],
        [stored, scale],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    out = save_model(model, tmp_path / "q.onnx", external_data=external)
    onnx.checker.check_model(str(out), full_check=True)
    got = ort.InferenceSession(str(out), providers=CPU).run(None, {})[0]
    np.testing.assert_array_equal(got, codes.astype(np.float32) * np.float32(0.05))
    loaded.store.release()

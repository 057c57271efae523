"""OrtCapture on a real three-node model: captured tensors against a float32 numpy oracle.

The model is ``x [batch, 4] -> MatMul(W1 [4, 5]) -> h -> Relu -> r -> MatMul(W2 [5, 3]) -> y``
with its weights as initializers and a symbolic batch; the session is a real CPU session.
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from ort_mlp import Recorder, data, mlp, reference

from qcal_export.capture.data import open_data
from qcal_export.capture.onnxruntime import OrtCapture, open_session, select_providers
from qcal_export.errors import DataError, ModelError

CPU = ["CPUExecutionProvider"]
FLOAT = TensorProto.FLOAT


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32
    assert got.shape == want.shape
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_captured_tensors_equal_the_float32_forward_pass():
    batches = data()
    capture = OrtCapture(mlp(), {"h": FLOAT, "r": FLOAT, "x": FLOAT}, providers=CPU)
    sink = Recorder()
    assert capture.run(open_data(batches), sink) == len(batches)
    for name in ("h", "r", "x"):
        got = sink.values(name)
        assert len(got) == len(batches)
        for value, b in zip(got, batches, strict=True):
            assert_close(value, reference(b["x"])[name])
    # the relu output really is the relu: some of h is negative, none of r is
    assert any((v < 0).any() for v in sink.values("h"))
    assert all((v >= 0).all() for v in sink.values("r"))
    # batch by batch: every tensor of batch i reaches the sink before any of batch i + 1
    names = [n for n, _ in sink.calls]
    assert names == ["h", "r", "x"] * len(batches)


def test_captured_tensors_equal_a_plain_session_exposing_them():
    """The capture session and a plain ORT session with h and r as graph outputs agree."""
    plain = mlp()
    plain.graph.output.extend([helper.make_tensor_value_info(n, FLOAT, None) for n in ("h", "r")])
    session = ort.InferenceSession(plain.SerializeToString(), providers=CPU)
    batches = data(seed=5)
    sink = Recorder()
    OrtCapture(mlp(), {"h": FLOAT, "r": FLOAT, "y": FLOAT}, providers=CPU).run(
        open_data(batches), sink
    )
    for i, b in enumerate(batches):
        y, h, r = session.run(["y", "h", "r"], b)
        assert np.array_equal(sink.values("h")[i], h)
        assert np.array_equal(sink.values("r")[i], r)
        assert np.array_equal(sink.values("y")[i], y)  # a graph output is captured as well
        assert_close(sink.values("y")[i], reference(b["x"])["y"])


def test_graph_input_comes_from_the_feed_not_from_a_session_output():
    batches = data()
    capture = OrtCapture(mlp(), {"x": FLOAT, "h": FLOAT}, providers=CPU)
    assert capture.fed == ["x"] and capture.fetched == ["h"]
    assert [o.name for o in capture._session.get_outputs()] == ["y", "h"]
    sink = Recorder()
    capture.run(open_data(batches), sink)
    for value, b in zip(sink.values("x"), batches, strict=True):
        assert np.array_equal(value, b["x"])


def test_tensors_argument_restricts_one_pass():
    batches = data()
    capture = OrtCapture(mlp(), {"x": FLOAT, "h": FLOAT, "r": FLOAT}, providers=CPU)
    sink = Recorder()
    capture.run(open_data(batches), sink, tensors=["r"])
    assert {n for n, _ in sink.calls} == {"r"}
    assert len(sink.calls) == len(batches)
    for value, b in zip(sink.values("r"), batches, strict=True):
        assert_close(value, reference(b["x"])["r"])
    only_input = Recorder()
    capture.run(open_data(batches), only_input, tensors=["x"])
    assert [n for n, _ in only_input.calls] == ["x"] * len(batches)


def test_max_batches_stops_early_and_on_batch_counts():
    batches = data(sizes=(2, 3, 4, 5, 6))
    pulled = []

    def make():
        for b in batches:
            pulled.append(b["x"].shape[0])
            yield b

    ticks = []
    sink = Recorder()
    capture = OrtCapture(mlp(), {"h": FLOAT}, providers=CPU)
    count = capture.run(open_data(make), sink, max_batches=2, on_batch=lambda: ticks.append(1))
    assert count == 2
    assert [v.shape[0] for v in sink.values("h")] == [2, 3]
    assert len(ticks) == 2
    assert pulled[:2] == [2, 3] and len(pulled) <= 3


def test_input_model_is_unchanged_by_capture():
    model = mlp()
    before = model.SerializeToString()
    capture = OrtCapture(model, {"h": FLOAT, "r": FLOAT, "x": FLOAT}, providers=CPU)
    assert model.SerializeToString() == before
    capture.run(open_data(data()), Recorder())
    assert model.SerializeToString() == before
    assert [o.name for o in model.graph.output] == ["y"]


def test_zero_batches_raise_data_error():
    capture = OrtCapture(mlp(), {"h": FLOAT}, providers=CPU)
    with pytest.raises(DataError, match="yielded no batch"):
        capture.run(open_data([]), Recorder())
    with pytest.raises(DataError, match="yielded no batch"):
        capture.run(open_data(data()), Recorder(), max_batches=0)


def test_bad_batch_raises_data_error_before_the_session_runs():
    batches = [*data(sizes=(2, 2)), {"x": np.zeros((2, 5), np.float32)}]
    sink = Recorder()
    capture = OrtCapture(mlp(), {"h": FLOAT}, providers=CPU)
    with pytest.raises(DataError, match=r"batch 2, input 'x': dim 1 is 5"):
        capture.run(open_data(batches), sink)
    assert len(sink.calls) == 2


def test_ort_failure_on_a_batch_is_a_data_error_naming_it():
    """With the feature dim symbolic the check passes and ORT itself rejects the MatMul."""
    capture = OrtCapture(mlp(x_dims=["batch", "features"]), {"h": FLOAT}, providers=CPU)
    batches = [*data(sizes=(2,)), {"x": np.zeros((2, 6), np.float32)}]
    with pytest.raises(DataError, match=r"^batch 1: ONNX Runtime failed on it"):
        capture.run(open_data(batches), Recorder())


def test_unloadable_model_is_a_model_error():
    model = mlp()
    model.graph.node[1].op_type = "NoSuchOp"
    with pytest.raises(ModelError, match=r"^ONNX Runtime cannot load broken\.onnx: "):
        open_session(model, CPU, "broken.onnx")


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available"
)
def test_cuda_without_cuda_is_a_data_error():
    with pytest.raises(DataError, match=r"provider 'cuda' requested.*onnxruntime-gpu"):
        select_providers("cuda")


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available"
)
def test_auto_without_cuda_gives_cpu_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="qcal_export.capture.onnxruntime"):
        assert select_providers("auto") == ["CPUExecutionProvider"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["CUDAExecutionProvider not available: capturing with CPUExecutionProvider"]


def test_cpu_and_unknown_providers():
    assert select_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(DataError, match="unknown provider 'tpu': choose auto, cpu or cuda"):
        select_providers("tpu")

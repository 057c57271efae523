"""Device-resident capture (IOBinding + DLPack) against the plain ``session.run`` path.

On the CPU the IOBinding path binds its outputs to ``cpu``: its tensors, and the scales
calibrated from them on the Conv + Gemm model of tests/convgemm.py, equal the plain path's
exactly. The ``cuda`` tests (skipped without the CUDA EP and a CUDA torch) check that the
calibrators get CUDA tensors and that the scales equal the CPU run's within float tolerance:

    python -m pytest -q tests/capture/test_iobinding.py
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from ort_mlp import Recorder, data, mlp, reference

from qcal_export.capture.data import open_data
from qcal_export.capture.iobinding import bind_device_id, to_torch
from qcal_export.capture.onnxruntime import OrtCapture, select_providers
from qcal_export.errors import DataError
from qcal_export.pipeline import calibrate as pipeline
from qcal_export.pipeline import scales_step

CPU = ["CPUExecutionProvider"]
FLOAT = TensorProto.FLOAT
METHODS = ("max", "mse", "percentile", "entropy")
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
# TF32 off: the CUDA EP's float32 matmuls and convolutions then round as the CPU's do.
CUDA = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="needs onnxruntime's CUDAExecutionProvider and a CUDA build of torch"
)


def captured(capture: OrtCapture, batches, **kwargs) -> Recorder:
    sink = Recorder()
    capture.run(open_data(batches), sink, **kwargs)
    return sink


def calibrate(workdir, method: str, monkeypatch, **capture_options) -> dict:
    """calibrate_onnx on the convgemm model, capture built with ``capture_options``;
    returns its scales and, per tensor, the devices the calibrators were handed."""
    devices: dict[str, set[str]] = {}
    made: list[OrtCapture] = []

    class Spy(OrtCapture):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, **capture_options})
            made.append(self)

        def run(self, source, sink, **kwargs):
            def spy(name, value):
                devices.setdefault(name, set()).add(str(value.device))
                sink(name, value)

            return super().run(source, spy, **kwargs)

    monkeypatch.setattr(scales_step, "OrtCapture", Spy)
    result = pipeline.calibrate_onnx(
        workdir / "model.onnx",
        workdir / "data",
        method=method,
        validate_batches=0,
        target="tensorrt",
    )
    monkeypatch.undo()
    assert len(made) == 1
    return {"scales": result.scales, "devices": devices, "capture": made[0]}


# --------------------------------------------------------------------------------------------
# CPU: the IOBinding path equals the plain path
# --------------------------------------------------------------------------------------------


def test_iobinding_tensors_equal_the_plain_run_on_cpu():
    batches = data(sizes=(3, 1, 0, 7, 2), seed=3)
    tensors = {"h": FLOAT, "r": FLOAT, "x": FLOAT, "y": FLOAT}
    bound = OrtCapture(mlp(), tensors, providers=CPU, iobinding=True)
    plain = OrtCapture(mlp(), tensors, providers=CPU)
    assert bound._bound is not None and plain._bound is None
    assert bound.device == plain.device == torch.device("cpu")
    got, want = captured(bound, batches), captured(plain, batches)
    assert [n for n, _ in got.calls] == [n for n, _ in want.calls] == ["h", "r", "y", "x"] * 5
    for (_, a), (_, b) in zip(got.calls, want.calls, strict=True):
        assert a.device.type == "cpu" and a.dtype == b.dtype == torch.float32
        assert torch.equal(a, b)
    for value, b in zip(got.values("r"), batches, strict=True):
        assert np.allclose(value, reference(b["x"])["r"], rtol=1e-5, atol=1e-6)


def test_iobinding_pass_restricted_to_the_input_or_to_one_output():
    batches = data()
    capture = OrtCapture(mlp(), {"x": FLOAT, "h": FLOAT}, providers=CPU, iobinding=True)
    only_input = captured(capture, batches, tensors=["x"])
    assert [n for n, _ in only_input.calls] == ["x"] * len(batches)
    for value, b in zip(only_input.values("x"), batches, strict=True):
        assert np.array_equal(value, b["x"])
    only_h = captured(capture, batches, tensors=["h"])
    assert [n for n, _ in only_h.calls] == ["h"] * len(batches)


def test_iobinding_failure_on_a_batch_is_a_data_error_naming_it():
    capture = OrtCapture(
        mlp(x_dims=["batch", "features"]), {"h": FLOAT}, providers=CPU, iobinding=True
    )
    batches = [*data(sizes=(2,)), {"x": np.zeros((2, 6), np.float32)}]
    with pytest.raises(DataError, match=r"^batch 1: ONNX Runtime failed on it"):
        capture.run(open_data(batches), Recorder())


@pytest.mark.parametrize("method", METHODS)
def test_iobinding_scales_equal_the_plain_run_on_cpu(workdir, method, monkeypatch):
    bound = calibrate(workdir, method, monkeypatch, iobinding=True, providers=CPU)
    plain = calibrate(workdir, method, monkeypatch, iobinding=False, providers=CPU)
    assert bound["capture"]._bound is not None and plain["capture"]._bound is None
    assert set(bound["scales"]) == set(plain["scales"])
    for name, want in plain["scales"].items():
        got = bound["scales"][name]
        assert torch.equal(got.amax, want.amax), name
        assert torch.equal(got.scale, want.scale), name
        assert torch.equal(got.zero_point, want.zero_point), name
    assert set(bound["devices"]) == {"x", "/Flatten_output_0"}
    assert all(d == {"cpu"} for d in bound["devices"].values())


def test_cpu_provider_keeps_the_plain_path_by_default(workdir):
    model = onnx.load(str(workdir / "model.onnx"))
    capture = OrtCapture(model, {"/Flatten_output_0": FLOAT}, providers=CPU)
    assert capture._bound is None and capture.device == torch.device("cpu")


def test_to_torch_shares_the_ortvalue_memory():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    value = ort.OrtValue.ortvalue_from_numpy(array)
    tensor = to_torch(value)
    assert tensor.data_ptr() == value.data_ptr()
    assert torch.equal(tensor, torch.from_numpy(array))

    class OldWrapper:
        """An OrtValue wrapper of onnxruntime < 1.32: DLPack only on its C value."""

        def __init__(self, inner):
            self._ortvalue = inner

    old = to_torch(OldWrapper(value._ortvalue))
    assert old.data_ptr() == value.data_ptr()


def test_device_id_goes_to_the_cuda_provider_only():
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert bind_device_id(providers, 3) == [
        ("CUDAExecutionProvider", {"device_id": "3"}),
        "CPUExecutionProvider",
    ]
    kept = bind_device_id([("CUDAExecutionProvider", {"device_id": "1", "x": "y"})], 0)
    assert kept == [("CUDAExecutionProvider", {"device_id": "1", "x": "y"})]
    assert bind_device_id(CPU, 2) == CPU


@pytest.mark.parametrize("device_id", [-1, 1.0, True, "0"])
def test_bad_device_id_is_a_data_error(device_id):
    with pytest.raises(DataError, match="device_id must be a GPU index >= 0"):
        OrtCapture(mlp(), {"h": FLOAT}, providers=CPU, device_id=device_id)


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch has CUDA here")
def test_cuda_session_with_a_cpu_torch_copies_to_the_host(monkeypatch, caplog):
    """A CUDA session whose tensors this torch cannot take: host copies and a warning, or a
    DataError when IOBinding was asked for explicitly."""
    from qcal_export.capture import onnxruntime as capture_module

    monkeypatch.setattr(capture_module, "session_device", lambda *_: torch.device("cuda", 0))
    with caplog.at_level("WARNING", logger="qcal_export.capture.onnxruntime"):
        capture = OrtCapture(mlp(), {"h": FLOAT}, providers=CPU)
    assert capture._bound is None and capture.device == torch.device("cpu")
    assert "this torch has no CUDA" in caplog.text and "copied to the host" in caplog.text
    assert len(captured(capture, data()).calls) == 4
    with pytest.raises(DataError, match=r"iobinding=True: .* this torch has no CUDA"):
        OrtCapture(mlp(), {"h": FLOAT}, providers=CPU, iobinding=True)


# --------------------------------------------------------------------------------------------
# CUDA: captured tensors stay on the GPU
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
def test_cuda_capture_hands_cuda_tensors_equal_to_the_cpu_run():
    batches = data(sizes=(3, 1, 7, 2), seed=9)
    tensors = {"h": FLOAT, "r": FLOAT, "x": FLOAT}
    capture = OrtCapture(mlp(), tensors, providers=CUDA)
    assert capture._bound is not None and capture.device == torch.device("cuda", 0)
    got = captured(capture, batches)
    want = captured(OrtCapture(mlp(), tensors, providers=CPU), batches)
    for (name, a), (_, b) in zip(got.calls, want.calls, strict=True):
        assert a.device == torch.device("cuda", 0), name
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
@needs_cuda
def test_cuda_output_is_a_view_of_ort_memory():
    value = ort.OrtValue.ortvalue_from_numpy(np.ones((2, 3), np.float32), "cuda", 0)
    tensor = to_torch(value)
    assert tensor.is_cuda and tensor.data_ptr() == value.data_ptr()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("method", METHODS)
def test_cuda_calibration_gets_cuda_tensors_and_the_cpu_scales(workdir, method, monkeypatch):
    cuda = calibrate(workdir, method, monkeypatch, providers=CUDA)
    cpu = calibrate(workdir, method, monkeypatch, providers=CPU)
    assert cuda["capture"].device == torch.device("cuda", 0)
    assert set(cuda["devices"]) == {"x", "/Flatten_output_0"}
    assert all(d == {"cuda:0"} for d in cuda["devices"].values()), cuda["devices"]
    for name, want in cpu["scales"].items():
        got = cuda["scales"][name]
        assert got.scale.device.type == "cpu"
        # float32 sums in another order: percentile/entropy thresholds may move by a bin
        torch.testing.assert_close(got.amax, want.amax, rtol=2e-2, atol=0, msg=name)
        torch.testing.assert_close(got.scale, want.scale, rtol=2e-2, atol=0, msg=name)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_device_id_puts_the_capture_on_that_gpu():
    capture = OrtCapture(mlp(), {"h": FLOAT}, providers=select_providers("cuda"), device_id=1)
    got = captured(capture, data())
    assert all(v.device == torch.device("cuda", 1) for _, v in got.calls)

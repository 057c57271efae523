"""calibrate_onnx edge cases that cross capture, calibrators and export."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qcal_export import calibrate_onnx
from qcal_export.formats import AMAX_FLOOR


def _matmul_model(path):
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], "mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return w


def test_mse_on_an_activation_that_is_always_empty_floors_and_says_so(tmp_path):
    w = _matmul_model(tmp_path / "m.onnx")
    batches = [{"x": np.zeros((0, 4), np.float32)} for _ in range(3)]
    result = calibrate_onnx(tmp_path / "m.onnx", batches, method="mse", output=tmp_path / "q.onnx")
    x_scales = result.scales["x"]
    assert x_scales.amax.item() == np.float32(AMAX_FLOOR)
    assert x_scales.scale.item() > 0 and np.isfinite(x_scales.scale.item())
    assert x_scales.notes == ["no values collected: amax floored"]
    assert result.report["batches_per_pass"] == [3]  # no second pass: nothing to refine
    # The weight was still calibrated per output channel (max |w| of each column / 127).
    np.testing.assert_allclose(result.scales["w"].scale.numpy(), np.abs(w).max(0) / 127)
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.zeros((0, 4), np.float32)})
    assert y.shape == (0, 3)

"""Entropy on a text recognizer (tests/recognizer.py): unbounded, KL clips the attention weights
to their near-zero bulk and the output drifts; bounded, the threshold stays near max's."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from recognizer import images, make_recognizer

from qcal_export.pipeline import calibrate_onnx

SOFTMAX = "/Softmax_output_0"


@pytest.fixture(scope="module")
def recognizer(tmp_path_factory):
    return make_recognizer(tmp_path_factory.mktemp("recognizer"))


def run(path, image: np.ndarray) -> np.ndarray:
    """The model's logits under ORT with optimizations off (the QDQ graph as written)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"image": image})[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_attention_weights_keep_their_peaks(recognizer, tmp_path):
    image = images(np.random.default_rng(99), 32)
    reference = run(recognizer / "recognizer.onnx", image)
    found = {}
    for name, options in {
        "max": {"method": "max"},
        "unbounded": {
            "method": "entropy",
            "method_options": {"quantized_bins": 128, "max_clipped": 1.0},
        },
        "entropy": {"method": "entropy"},
    }.items():
        result = calibrate_onnx(
            recognizer / "recognizer.onnx",
            recognizer / "data",
            output=tmp_path / f"{name}.onnx",
            validate_batches=0,
            **options,
        )
        amax = float(result.scales[SOFTMAX].amax.max())
        found[name] = amax, cosine(run(tmp_path / f"{name}.onnx", image), reference)
    (max_amax, max_cos), (loose, loose_cos), (tight, tight_cos) = found.values()
    assert loose < 0.6 * max_amax and tight > 0.95 * max_amax
    assert loose_cos < 0.99 < 0.999 < tight_cos and tight_cos > max_cos - 1e-3

"""Entropy on a text recognizer (tests/recognizer.py): unbounded, KL clips the attention weights
to their near-zero bulk and the output drifts; bounded, the threshold stays near max's."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from recognizer import images, make_recognizer

from qcal_export.pipeline.calibrate import calibrate_onnx

SOFTMAX = "/Softmax_output_0"
UNBOUNDED = {"quantized_bins": 128, "max_clipped": 1.0}
"""The entropy calibrator before the fix: ORT's 128 quantized bins, no bound on clipping."""


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
        "unbounded": {"method": "entropy", "method_options": UNBOUNDED},
        "entropy": {"method": "entropy"},
    }.items():
        result = calibrate_onnx(
            recognizer / "recognizer.onnx",
            recognizer / "data",
            output=tmp_path / f"{name}.onnx",
            validate_batches=0,
            target="tensorrt",
            **options,
        )
        amax = float(result.scales[SOFTMAX].amax.max())
        found[name] = amax, cosine(run(tmp_path / f"{name}.onnx", image), reference)
    (max_amax, max_cos), (loose, loose_cos), (tight, tight_cos) = found.values()
    assert loose < 0.6 * max_amax and tight > 0.95 * max_amax
    assert loose_cos < 0.99 < 0.999 < tight_cos and tight_cos > max_cos - 1e-3


def test_the_verdict_catches_the_collapse_and_passes_the_fix(recognizer):
    """On the batch held out of the 8: unbounded entropy is below the 0.99 cosine target."""
    verdicts = {}
    for name, options in {"unbounded": UNBOUNDED, "entropy": {}, "max": {}}.items():
        method = "max" if name == "max" else "entropy"
        result = calibrate_onnx(
            recognizer / "recognizer.onnx",
            recognizer / "data",
            method=method,
            method_options=options,
        )
        verdicts[name] = result.report["verdict"]
    assert verdicts["unbounded"]["status"] == "below target"
    assert verdicts["entropy"]["status"] == verdicts["max"]["status"] == "pass"
    assert verdicts["entropy"]["batches"] == "held out: every 5th batch (1 batch: 4)"

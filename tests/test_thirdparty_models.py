"""Real models from other exporters, shipped in PyPI packages under Apache-2.0: PaddleOCR's
text detector and recognizer (rapidocr-onnxruntime, paddle2onnx at opset 12, weights in
Constant nodes) and magika's file-type classifier (jax2tf, a weight behind a Transpose).

Each calibrates with int8 and fp8 on data in its own form (pages and text lines drawn with
Pillow, magika's byte features of files on this machine), and is checked against the float
model run by ONNX Runtime on held-out batches: every Conv/ConvTranspose/MatMul/Gemm whose
weight the exporter made constant stores it quantized (counted on the exporter's own node
list), the output cosine stays above a bound well under what these models reach and well above
a collapse, and the recognizer's decoded text agrees character by character.

Opt-in, skipped where the packages are absent: the tests read only the model files, and both
packages depend on the CPU ``onnxruntime`` (which would sit beside ``onnxruntime-gpu``), so
install them without dependencies: ``pip install --no-deps rapidocr-onnxruntime==1.4.4
magika==1.0.3``, then ``python3 -m pytest -q tests/test_thirdparty_models.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from thirdparty import (
    DETECTOR,
    MAGIKA,
    RECOGNIZER,
    char_agreement,
    ctc_characters,
    ctc_decode,
    magika_features,
    magika_files,
    model_path,
    ocr_crops,
    ocr_pages,
)

from qcal_export import calibrate_onnx

pytestmark = pytest.mark.slow
CPU = ["CPUExecutionProvider"]
WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
INSTALL = "rapidocr-onnxruntime==1.4.4 magika==1.0.3"
STORED = {"int8": onnx.TensorProto.INT8, "fp8": onnx.TensorProto.FLOAT8E4M3FN}


def installed(entry: tuple[str, str]) -> Path:
    """The model file, or a skip naming the package to install (found without importing it:
    rapidocr's import needs OpenCV, which the model does not)."""
    path = model_path(*entry)
    if path is None:
        pytest.skip(f"{entry[0]} is not installed (pip install --no-deps {INSTALL})")
    return path


def constant_weight_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """``{node name: op type}`` of the exporter's weighted nodes whose input 1 computes from
    no graph input (an initializer, a Constant node, or ops on those)."""
    varying = {i.name for i in model.graph.input}
    for node in model.graph.node:
        if any(t in varying for t in node.input):
            varying.update(node.output)
    return {
        n.name: n.op_type
        for n in model.graph.node
        if n.op_type in WEIGHTED_OPS and n.input[1] not in varying
    }


def stored_weight_types(model: onnx.ModelProto, names: dict[str, str]) -> dict[str, int]:
    """The element type in which each of ``names``' weights is stored in the QDQ ``model``:
    the initializer a DequantizeLinear reads for input 1 (FLOAT where it reads none)."""
    inits = {t.name: t.data_type for t in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    found = {}
    for node in model.graph.node:
        if node.name in names:
            dq = producers.get(node.input[1])
            stored = dq.input[0] if dq is not None and dq.op_type == "DequantizeLinear" else ""
            found[node.name] = inits.get(stored, onnx.TensorProto.FLOAT)
    return found


def run_both(float_path: Path, quantized: Path, feeds: list[dict]) -> tuple[np.ndarray, ...]:
    """The first output of both models on ``feeds``, by ORT at its default optimizations (what
    a deployment runs), concatenated along the batch axis."""
    outs = []
    for path in (float_path, quantized):
        session = ort.InferenceSession(path, providers=CPU)
        outs.append(np.concatenate([session.run(None, f)[0] for f in feeds]))
    return tuple(outs)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def calibrate_and_check(path: Path, tmp_path: Path, fmt: str, calib: list, held: list):
    """Calibrate ``path`` in ``fmt``, check every constant weight is stored quantized, and
    return the float and quantized outputs on ``held``."""
    out = tmp_path / f"{fmt}.onnx"
    calibrate_onnx(path, calib, output=out, format=fmt, validate_data=held)
    original = onnx.load(path)
    expected = constant_weight_nodes(original)
    stored = stored_weight_types(onnx.load(out), expected)
    assert stored == dict.fromkeys(expected, STORED[fmt])
    assert out.stat().st_size < path.stat().st_size / 3
    return run_both(path, out, held)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_ocr_detector(tmp_path, fmt):
    """64 Conv/ConvTranspose weights in Constant nodes, all stored quantized; the probability
    map keeps cosine > 0.95 (both formats reach about 0.98) and the text mask rapidocr cuts at
    0.3 keeps IoU > 0.9."""
    path = installed(DETECTOR)
    rng = np.random.default_rng(0)
    calib = [{"x": ocr_pages(rng, 2, 256)} for _ in range(4)]
    held = [{"x": ocr_pages(rng, 2, 256)} for _ in range(2)]
    want, got = calibrate_and_check(path, tmp_path, fmt, calib, held)
    assert len(constant_weight_nodes(onnx.load(path))) == 64
    assert cosine(want, got) > 0.95
    text, quantized_text = want > 0.3, got > 0.3
    assert (text & quantized_text).sum() / (text | quantized_text).sum() > 0.9


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_ocr_recognizer(tmp_path, fmt):
    """38 Conv and 9 MatMul weights stored quantized (4 attention MatMuls read two activations);
    the greedy CTC decoding of the quantized model agrees with the float one on > 90% of the
    characters of held-out text lines: int8 and fp8 reach 0.93-0.99 (the misses are stray
    characters in the padding), a collapse (entropy before its fix, int4 weights per channel)
    falls under 0.1."""
    path = installed(RECOGNIZER)
    rng = np.random.default_rng(1)
    calib = [{"x": ocr_crops(rng, 4)[0]} for _ in range(4)]
    held = [{"x": ocr_crops(rng, 8)[0]} for _ in range(2)]
    want, got = calibrate_and_check(path, tmp_path, fmt, calib, held)
    assert len(constant_weight_nodes(onnx.load(path))) == 47
    alphabet = ctc_characters(path)
    float_text, quantized_text = ctc_decode(want, alphabet), ctc_decode(got, alphabet)
    assert char_agreement(float_text, quantized_text) > 0.9


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_magika(tmp_path, fmt):
    """The Dense, Conv (weight behind a Transpose) and output MatMul weights stored quantized;
    the class probabilities keep cosine > 0.98 and the predicted file type agrees on > 90% of
    held-out files."""
    path = installed(MAGIKA)
    features = np.stack([magika_features(f) for f in magika_files(48)])
    calib = [{"bytes": features[i : i + 8]} for i in range(0, 32, 8)]
    held = [{"bytes": features[i : i + 8]} for i in range(32, 48, 8)]
    want, got = calibrate_and_check(path, tmp_path, fmt, calib, held)
    assert len(constant_weight_nodes(onnx.load(path))) == 3
    assert cosine(want, got) > 0.98
    assert (want.argmax(-1) == got.argmax(-1)).mean() > 0.9

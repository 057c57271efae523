"""``qcal demo``: calibrate all-MiniLM-L6-v2 on docstrings and score it on held-out text."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qcal_export.demo.evaluate import embedding_cosine
from qcal_export.demo.model import demo_model_path
from qcal_export.demo.texts import demo_batches, demo_texts
from qcal_export.pipeline.calibrate import ProgressFactory, calibrate_onnx
from qcal_export.spec.methods import METHODS

NUM_CALIB, NUM_HELDOUT, BATCH_SIZE = 256, 128, 16


def run_demo(
    out_dir: Path,
    formats: Sequence[str] = ("int8", "fp8", "nvfp4"),
    methods: Sequence[str] = ("max",),
    weight_methods: Sequence[str] = ("max", "mse", "nvfp4-mse"),
    *,
    activation_format: str | None = None,
    cache_dir: str | Path | None = None,
    progress: ProgressFactory | None = None,
) -> list[dict[str, Any]]:
    """One row per (format, activation method, weight method): held-out embedding cosine vs
    float, mean relative weight error, time, model path and its HTML report's.

    Each run takes calibrate's defaults beside its formats and methods (target ort: int8 runs
    get uint8 activations, ``activation_format`` in the row), or ``activation_format`` for
    every row (int16 with int8 weights: A16W8).
    Calibration and held-out texts are disjoint; int8/fp8 weights are per output channel, NVFP4
    weights per block of 16 (nvfp4-mse applies to nvfp4 only). NVFP4 models are validated
    and scored in ONNX Runtime over their exact FP4 emulation (ORT has no FP4 kernels).
    """
    float_model = demo_model_path(cache_dir)
    calib_texts, heldout_texts = demo_texts(NUM_CALIB, NUM_HELDOUT)
    calib = demo_batches(calib_texts, batch_size=BATCH_SIZE)
    heldout = demo_batches(heldout_texts, batch_size=BATCH_SIZE)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [
        (fmt, method, weight_method)
        for fmt in formats
        for method in methods
        for weight_method in weight_methods
        if weight_method not in METHODS or METHODS[weight_method].calibrates(fmt)
    ]
    return [
        _demo_row(float_model, calib, heldout, out_dir, run, activation_format, progress=progress)
        for run in runs
    ]


def _demo_row(
    float_model: Path,
    calib: list[dict[str, np.ndarray]],
    heldout: list[dict[str, np.ndarray]],
    out_dir: Path,
    run: tuple[str, str, str],
    activation_format: str | None,
    *,
    progress: ProgressFactory | None,
) -> dict[str, Any]:
    """Calibrate the float model with one (format, method, weight method) and score it."""
    fmt, method, weight_method = run
    activations = "" if activation_format is None else f"{activation_format}-"
    stem = out_dir / f"minilm_{fmt}_a-{activations}{method}_w-{weight_method}"
    start = time.perf_counter()
    result = calibrate_onnx(
        float_model,
        calib,
        output=stem.with_suffix(".onnx"),
        scales=stem.with_suffix(".safetensors"),
        report=stem.with_suffix(".json"),
        html=stem.with_suffix(".html"),
        format=fmt,
        activation_format=activation_format,
        method=method,
        weight_method=weight_method,
        validate_batches=1,
        validate_data=heldout,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    score = embedding_cosine(float_model, stem.with_suffix(".onnx"), heldout)
    errors = [r["weight_rel_error"] for r in result.report["tensors"] if r["kind"] == "weight"]
    return {
        "format": fmt,
        "activation_format": (result.report["recipe"]["activation"] or {}).get("format", "none"),
        "method": method,
        "weight_method": weight_method,
        "weight_error": sum(errors) / len(errors),
        "seconds": seconds,
        "model": str(stem.with_suffix(".onnx")),
        "html": str(stem.with_suffix(".html")),
        **score,
    }

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
MIXED_ROW = {"target": "tensorrt", "view_batches": 1}
"""The mixed-format row's placement (the MatMul inputs, as TensorRT places Q/DQ) and the
calibration batches its sensitivity is measured on."""


def run_demo(
    out_dir: Path,
    formats: Sequence[str] = ("int8", "fp8", "nvfp4"),
    methods: Sequence[str] = ("max",),
    weight_methods: Sequence[str] = ("max", "mse", "nvfp4-mse"),
    *,
    activation_format: str | None = None,
    mixed_formats: Sequence[str] = (),
    target_cosine: float = 0.99,
    cache_dir: str | Path | None = None,
    progress: ProgressFactory | None = None,
) -> list[dict[str, Any]]:
    """One row per (format, activation method, weight method): held-out embedding cosine vs
    float, mean relative weight error, time, model path and its HTML report's; and, where
    ``mixed_formats`` are given, one more row: the mixed-format search among them (cheapest
    first) for ``target_cosine``, placed as TensorRT does, with its bits per weight and per
    activation.

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
    rows = [
        _demo_row(float_model, calib, heldout, out_dir, run, activation_format, progress=progress)
        for run in runs
    ]
    if mixed_formats:
        mixed = {"formats": tuple(mixed_formats), "target_cosine": target_cosine}
        run = ("mixed-" + "-".join(mixed_formats), "max", "max")
        rows.append(
            _demo_row(float_model, calib, heldout, out_dir, run, None, progress, mixed=mixed)
        )
    return rows


def _demo_row(
    float_model: Path,
    calib: list[dict[str, np.ndarray]],
    heldout: list[dict[str, np.ndarray]],
    out_dir: Path,
    run: tuple[str, str, str],
    activation_format: str | None,
    progress: ProgressFactory | None,
    *,
    mixed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Calibrate the float model with one (format, method, weight method), or the mixed-format
    search of ``mixed`` (``formats``, ``target_cosine``; ``run``'s format names its files),
    and score it."""
    fmt, method, weight_method = run
    activations = "" if activation_format is None else f"{activation_format}-"
    stem = out_dir / f"minilm_{fmt}_a-{activations}{method}_w-{weight_method}"
    search = {"format": mixed["formats"][0], **MIXED_ROW, **mixed} if mixed else {}
    start = time.perf_counter()
    result = calibrate_onnx(
        float_model,
        calib,
        output=stem.with_suffix(".onnx"),
        scales=stem.with_suffix(".safetensors"),
        report=stem.with_suffix(".json"),
        html=stem.with_suffix(".html"),
        activation_format=activation_format,
        method=method,
        weight_method=weight_method,
        validate_batches=1,
        validate_data=heldout,
        progress=progress,
        **({"format": fmt} | search),
    )
    seconds = time.perf_counter() - start
    score = embedding_cosine(float_model, stem.with_suffix(".onnx"), heldout)
    errors = [r["weight_rel_error"] for r in result.report["tensors"] if "weight_rel_error" in r]
    row = {
        "format": fmt,
        "activation_format": (result.report["recipe"]["activation"] or {}).get("format", "none"),
        "method": method,
        "weight_method": weight_method,
        "weight_error": sum(errors) / len(errors) if errors else float("nan"),
        "seconds": seconds,
        "model": str(stem.with_suffix(".onnx")),
        "html": str(stem.with_suffix(".html")),
        **score,
    }
    return row | (_mixed_fields(result.report, mixed) if mixed else {})


def _mixed_fields(report: dict[str, Any], mixed: dict[str, Any]) -> dict[str, Any]:
    """A mixed-format row's label, and its bits per weight and per activation."""
    bits = report["mixed_formats"]["bits"]
    return {
        "format": f"{','.join(mixed['formats'])} for cosine {mixed['target_cosine']}",
        "activation_format": "mixed",
        "bits_per_weight": bits["per_weight"],
        "bits_per_activation": bits["per_activation"],
    }

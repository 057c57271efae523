"""``qcal demo``: calibrate all-MiniLM-L6-v2 on docstrings and score it on held-out text."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qcal_export.demo.evaluate import embedding_cosine
from qcal_export.demo.model import demo_model_path
from qcal_export.demo.texts import demo_batches, demo_texts
from qcal_export.pipeline import ProgressFactory, calibrate_onnx

NUM_CALIB, NUM_HELDOUT, BATCH_SIZE = 256, 128, 16


def run_demo(
    out_dir: Path,
    formats: Sequence[str] = ("int8", "fp8"),
    methods: Sequence[str] = ("max", "mse"),
    *,
    cache_dir: str | Path | None = None,
    progress: ProgressFactory | None = None,
) -> list[dict[str, Any]]:
    """One row per (format, method): held-out embedding cosine vs float, time, model path.

    Calibration and held-out texts are disjoint; weights are int8/fp8 per output channel.
    """
    float_model = demo_model_path(cache_dir)
    calib_texts, heldout_texts = demo_texts(NUM_CALIB, NUM_HELDOUT)
    calib = demo_batches(calib_texts, batch_size=BATCH_SIZE)
    heldout = demo_batches(heldout_texts, batch_size=BATCH_SIZE)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for fmt in formats:
        for method in methods:
            stem = out_dir / f"minilm_{fmt}_{method}"
            start = time.perf_counter()
            calibrate_onnx(
                float_model,
                calib,
                output=stem.with_suffix(".onnx"),
                scales=stem.with_suffix(".safetensors"),
                report=stem.with_suffix(".json"),
                format=fmt,
                method=method,
                progress=progress,
            )
            seconds = time.perf_counter() - start
            score = embedding_cosine(float_model, stem.with_suffix(".onnx"), heldout)
            rows.append(
                {
                    "format": fmt,
                    "method": method,
                    "seconds": seconds,
                    "model": str(stem.with_suffix(".onnx")),
                    **score,
                }
            )
    return rows
